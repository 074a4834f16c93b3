"""The token cache: cached tokens are the tokenizer's codes of the train rows, the cache is reused for the
same tokenizer and data and rebuilt when either changes, left-right flips mirror image, labels and conditions."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

from medaug import vocab
from medaug.data.index import read_index, write_index
from medaug.data.structures import StructureTable, read_domain_names
from medaug.train.checkpoint import ENGINE_KEYS, load_checkpoint, save_checkpoint
from medaug.train.token_cache import (
    TOKENS_FILE,
    TokenCacheConfig,
    TokenDataset,
    flip_tables,
    lateral_axis,
    prepare_token_cache,
    present_from_label,
    tokenizer_sha256,
    train_view,
)
from medaug.models.vqvae import IGNORE_LABEL
from medaug.train.tokenizer import load_tokenizer


def tokenizer_inputs(checkpoint: Path, prepared: Path):
    vqvae, meta = load_tokenizer(checkpoint)
    table = StructureTable.from_records(meta["structure_table"])
    return vqvae, table, tuple(read_domain_names(prepared)), tokenizer_sha256(checkpoint)


def encode(vqvae, image_CHW: torch.Tensor, mask_C: torch.Tensor, label_HW: torch.Tensor) -> np.ndarray:
    """Tokens (L,) of one slice straight through the tokenizer (the reference for the cache)."""
    indices = vqvae.img_to_indices(image_CHW[None], mask_C[None], label_HW[None])
    return vqvae.quantizer.indices_to_tokens(indices)[0].numpy()


def test_cached_tokens_and_conditions_are_those_of_the_train_rows(tiny_var_task, tiny_tokenizer_run, tiny_prepared):
    cache = tiny_var_task.cache
    vqvae, table, domains, _ = tokenizer_inputs(Path(tiny_tokenizer_run["checkpoint"]), tiny_prepared)
    dataset = train_view(tiny_prepared, table, domains, vqvae)
    assert len(cache) == len(dataset) and not cache.flipped_N.any()
    assert cache.tokens().dtype == np.int16 and cache.tokens().shape == (len(dataset), 155)
    frame = read_index(tiny_prepared / "index.parquet").to_pandas().set_index("slice_id")
    for row in (0, len(cache) // 2, len(cache) - 1):
        item = dataset[int(cache.position_N[row])]
        np.testing.assert_array_equal(cache.tokens()[row], encode(vqvae, item["image"], item["channel_mask"], item["label"]))
        index_row = frame.loc[cache.slice_ids[row]]
        assert domains[cache.domain_N[row]] == index_row["domain"]
        assert cache.annotated_NS[row].tolist() == [name in set(index_row["structures_annotated"]) for name in table.names]
        # at the stored 64² the tokenizer sees every labelled pixel: present = the index's structures_present
        # covering at least conditioning.min_pixels pixels (the cache's present_min_pixels)
        shown = {name for name, pixels in zip(index_row["structures_present"], index_row["structure_pixels"])
                 if pixels >= cache.info["present_min_pixels"]}
        assert cache.info["present_min_pixels"] == tiny_var_task.recipe.conditioning.min_pixels == 8
        assert cache.present_NS[row].tolist() == [name in shown for name in table.names]


def _permuted_tokenizer(checkpoint: Path, out: Path, permutation: torch.Tensor) -> Path:
    """A copy of the tokenizer whose codebook rows are permuted: new code i = old code permutation[i]."""
    loaded = load_checkpoint(checkpoint, trainer=False)
    state = dict(loaded.state_dicts["model"])
    state["quantizer.embedding.weight"] = state["quantizer.embedding.weight"][permutation].clone()
    metadata = {key: value for key, value in loaded.meta.items() if key not in ENGINE_KEYS}
    return save_checkpoint(out / "checkpoints", loaded.step, "tokenizer", {"model": state}, None, metadata)


def test_cache_is_reused_for_the_same_tokenizer_and_rebuilt_for_another(tiny_tokenizer_run, tiny_prepared, tmp_path):
    checkpoint = Path(tiny_tokenizer_run["checkpoint"])
    vqvae, table, domains, sha = tokenizer_inputs(checkpoint, tiny_prepared)
    config = TokenCacheConfig(batch_size=16)
    first = prepare_token_cache(tiny_prepared, vqvae, table, domains, sha, tmp_path / "cache", config)
    written = (first.path / TOKENS_FILE).stat().st_mtime_ns
    again = prepare_token_cache(tiny_prepared, vqvae, table, domains, sha, tmp_path / "cache", config)
    assert first.built and not again.built and again.path == first.path
    assert (again.path / TOKENS_FILE).stat().st_mtime_ns == written  # not rewritten
    np.testing.assert_array_equal(again.tokens(), first.tokens())

    codes = vqvae.quantizer.config.codebook_size
    permutation = torch.randperm(codes, generator=torch.Generator().manual_seed(0))
    other = _permuted_tokenizer(checkpoint, tmp_path / "other-tokenizer", permutation)
    other_vqvae, _, _, other_sha = tokenizer_inputs(other, tiny_prepared)
    assert other_sha != sha
    rebuilt = prepare_token_cache(tiny_prepared, other_vqvae, table, domains, other_sha, tmp_path / "cache", config)
    assert rebuilt.built and rebuilt.path != first.path and rebuilt.path.parent == first.path.parent
    # the same vectors under new code numbers: old code j is new code inverse[j]. The distances come from
    # one matrix product over the permuted codebook, whose float rounding may differ in the last bit, so a
    # near tie between two codes can flip (CI once saw 5 of 5,115 tokens flip); anything more is a bug.
    inverse = torch.argsort(permutation).numpy()
    agree = np.asarray(rebuilt.tokens()) == inverse[np.asarray(first.tokens())]
    assert agree.mean() >= 0.995, f"{(~agree).sum()} of {agree.size} tokens differ"


def test_present_counts_annotated_structures_from_min_pixels_on():
    generator = torch.Generator().manual_seed(3)
    label_BHW = torch.randint(0, 6, (4, 16, 16), generator=generator, dtype=torch.uint8)
    label_BHW[0, :8] = IGNORE_LABEL  # ignored pixels count for nothing
    label_BHW[1] = 0
    label_BHW[1, 0, :7] = 2  # a 7-pixel sliver of structure 2
    label_BHW[2] = 3
    annotated_BS = torch.ones(4, 5, dtype=torch.bool)
    annotated_BS[3, 4] = False  # structure 5 not annotated in row 3
    for min_pixels in (1, 7, 8, 60):
        present_BS = present_from_label(label_BHW, annotated_BS, min_pixels)
        for b in range(4):
            counts_K = np.bincount(label_BHW[b].numpy().ravel(), minlength=256)
            expected = [bool(counts_K[s] >= min_pixels and annotated_BS[b, s - 1]) for s in range(1, 6)]
            assert present_BS[b].tolist() == expected, (min_pixels, b)
    assert present_from_label(label_BHW, annotated_BS, 7)[1, 1] and not present_from_label(label_BHW, annotated_BS, 8)[1, 1]


def test_the_present_threshold_is_part_of_the_cache_key(tiny_tokenizer_run, tiny_prepared, tmp_path):
    vqvae, table, domains, sha = tokenizer_inputs(Path(tiny_tokenizer_run["checkpoint"]), tiny_prepared)
    one = prepare_token_cache(tiny_prepared, vqvae, table, domains, sha, tmp_path / "cache", TokenCacheConfig())
    many = prepare_token_cache(tiny_prepared, vqvae, table, domains, sha, tmp_path / "cache",
                               TokenCacheConfig(present_min_pixels=200))
    assert many.built and many.path != one.path and many.info["present_min_pixels"] == 200
    np.testing.assert_array_equal(many.tokens(), one.tokens())
    assert (many.present_NS <= one.present_NS).all() and many.present_NS.sum() < one.present_NS.sum()


def test_cache_is_rebuilt_when_the_prepared_index_changes(tiny_tokenizer_run, tiny_prepared, tmp_path):
    vqvae, table, domains, sha = tokenizer_inputs(Path(tiny_tokenizer_run["checkpoint"]), tiny_prepared)
    copy = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, copy)
    frame = read_index(copy / "index.parquet").to_pandas()
    moved = frame.index[frame["split"] == "train"][0]
    frame.loc[moved, "split"] = "test"  # one train row fewer
    write_index(frame, copy / "index.parquet")
    config = TokenCacheConfig(batch_size=32)
    original = prepare_token_cache(tiny_prepared, vqvae, table, domains, sha, tmp_path / "cache", config)
    changed = prepare_token_cache(copy, vqvae, table, domains, sha, tmp_path / "cache", config)
    assert changed.built and changed.path != original.path
    assert len(changed) == len(original) - 1 and frame.loc[moved, "slice_id"] not in changed.slice_ids


def test_lateral_axis_follows_the_affine():
    axial = np.array([[0, -8, 0, 255], [-8, 0, 0, 256], [0, 0, 17, -62], [0, 0, 0, 1]], dtype=float)
    assert lateral_axis(axial.ravel()) == 1  # columns run right-to-left
    transposed = axial[:, [1, 0, 2, 3]]
    assert lateral_axis(transposed.ravel()) == 0
    sagittal = np.array([[0, 0, 2, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert lateral_axis(sagittal.ravel()) is None  # in-plane axes are S and A: no left-right flip in the slice


def test_flip_adds_mirrored_rows_with_swapped_labels_and_conditions(tiny_tokenizer_run, tiny_prepared, tmp_path):
    vqvae, table, domains, sha = tokenizer_inputs(Path(tiny_tokenizer_run["checkpoint"]), tiny_prepared)
    plain = prepare_token_cache(tiny_prepared, vqvae, table, domains, sha, tmp_path / "cache", TokenCacheConfig())
    flipped = prepare_token_cache(tiny_prepared, vqvae, table, domains, sha, tmp_path / "cache", TokenCacheConfig(flip=True))
    assert flipped.path != plain.path
    count = len(plain)  # every phantom slice is axial, and each lateral structure's mirror is in the table
    assert len(flipped) == 2 * count and flipped.flipped_N.tolist() == [False] * count + [True] * count
    np.testing.assert_array_equal(flipped.tokens()[:count], plain.tokens())
    left, right = table.names.index("kidney_left"), table.names.index("kidney_right")
    lut = np.array(vocab.lateral_swap_lut())
    assert lut[vocab.structure("kidney_left").id] == vocab.structure("kidney_right").id
    rows = [r for r in range(count, 2 * count) if flipped.present_NS[r, left] != flipped.present_NS[r, right]]
    assert rows, "no flipped row shows one kidney only"
    row = rows[0]
    original = int(np.flatnonzero((plain.position_N == flipped.position_N[row]))[0])
    swapped = list(range(table.num_structures))
    swapped[left], swapped[right] = right, left
    assert flipped.present_NS[row].tolist() == plain.present_NS[original, swapped].tolist()
    assert flipped.annotated_NS[row].tolist() == plain.annotated_NS[original, swapped].tolist()
    item = train_view(tiny_prepared, table, domains, vqvae)[int(flipped.position_N[row])]
    to_vocab, to_local = table.local_to_vocab_lut(), table.vocab_to_local_lut()
    mirrored_label = torch.from_numpy(to_local[lut[to_vocab[item["label"].numpy()]]].astype(np.int64)).flip(-1)
    expected = encode(vqvae, item["image"].flip(-1), item["channel_mask"], mirrored_label)
    np.testing.assert_array_equal(flipped.tokens()[row], expected)
    assert flip_tables(table).label_lut[left + 1] == right + 1


def test_dataset_reads_batches_and_pickles_without_the_memory_map(tiny_var_task):
    dataset = TokenDataset(tiny_var_task.cache)
    batch = dataset.read_batch([3, 0, 3])
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (3, 155)
    np.testing.assert_array_equal(batch["tokens"].numpy(), tiny_var_task.cache.tokens()[[3, 0, 3]])
    assert torch.equal(batch["present"][0], torch.from_numpy(tiny_var_task.cache.present_NS[3]))
    copy = pickle.loads(pickle.dumps(dataset))  # what a DataLoader worker receives
    assert copy.cache.tokens_NL is None  # the worker maps the file itself rather than receiving a copy
    assert torch.equal(copy.read_batch([3, 0, 3])["tokens"], batch["tokens"])
    info = json.loads((tiny_var_task.cache.path / "cache.json").read_text())
    assert info["rows"] == len(dataset) and info["tokens_per_row"] == 155
