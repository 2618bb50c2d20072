"""Sparse inference: SparseLinear equals nn.Linear, sparsify keeps a model's outputs, the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from conftest import GLUE_FIXTURES
from diffprune.errors import DiffpruneError, DiffpruneWarning
from diffprune.sparse import SparseLinear, sparsify
from diffprune.sparse import kernel

TOL = 1e-4


def _pruned_linear(out_f, in_f, sparsity, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        linear.weight[torch.rand(out_f, in_f, generator=g) < sparsity] = 0
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=g))
    return linear


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(32, 32), (96, 32), (17, 50), (1, 7)])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), (17,), (1, 40), (1, 128)])
def test_sparse_linear_equals_dense(sparsity, shape, lead):
    """Whole and partial token tiles (16 and 32 wide), widths a multiple of 8 (shuffled blocks)
    and not."""
    linear = _pruned_linear(*shape, sparsity)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(*lead, shape[1])
    with torch.no_grad():
        expected = linear(x)
        y = sparse(x)
        assert y.shape == expected.shape
        assert (y - expected).abs().max() <= TOL
        assert torch.equal(sparse(x.transpose(0, -1).contiguous().transpose(0, -1)), y)  # a strided input


def test_empty_and_full_rows_no_bias_and_two_threads():
    linear = _pruned_linear(40, 24, 0.8, bias=False)
    with torch.no_grad():
        linear.weight[3] = 0  # an empty row
        linear.weight[5] = torch.randn(24)  # a fully dense row
        linear.weight[6, :5] = torch.randn(5)  # 4 at a time plus a remainder
    sparse = SparseLinear.from_linear(linear)
    assert sparse.dense_weight().equal(linear.weight.detach())
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            # one tile: two threads split its rows; four tiles: they split the tiles
            for x in (torch.randn(2, 9, 24), torch.randn(2, 64, 24)):
                with torch.no_grad():
                    assert (sparse(x) - linear(x)).abs().max() <= TOL
            if n <= kernel.max_threads():  # numba runs on the threads torch was told
                assert kernel.kernel_threads() == n
                if n > 1:
                    assert kernel.numba().get_num_threads() == n
    finally:
        torch.set_num_threads(threads)


def test_row_cuts_balance_nonzeros_at_multiples_of_eight():
    import numpy as np

    counts = np.array([100] + [1] * 30 + [100])  # the nonzeros piled into the first and last rows
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    cuts = kernel.row_cuts(indptr, 2)
    assert cuts[0] == 0 and cuts[-1] == 32 and list(cuts) == sorted(set(cuts))
    assert all(c % 8 == 0 for c in cuts)
    halves = [indptr[b] - indptr[a] for a, b in zip(cuts[:-1], cuts[1:])]
    assert max(halves) <= 124  # about half each, not 16 rows each by count


def test_repeated_input_changed_in_place_is_transposed_again():
    linear = _pruned_linear(8, 16, 0.5)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(4, 16)
    with torch.no_grad():
        first = sparse(x)
        x.mul_(2)  # the same tensor object, changed: the kept transpose must not be reused
        assert (sparse(x) - linear(x)).abs().max() <= TOL
        assert not torch.allclose(first, sparse(x))
    with torch.inference_mode():
        y = torch.randn(4, 16)
        assert (sparse(y) - linear(y)).abs().max() <= TOL


def test_a_copy_and_a_load_change_what_the_kernel_reads():
    import copy

    linear = _pruned_linear(8, 16, 0.5)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(3, 16)
    with torch.no_grad():
        sparse(x)  # its views of the buffers are made
        twin = copy.deepcopy(sparse)
        state = {k: v * 2 if k in ("values", "bias") else v for k, v in sparse.state_dict().items()}
        twin.load_state_dict(state)  # written in place into the copy's buffers
        assert (twin(x) - 2 * linear(x)).abs().max() <= TOL
        assert (sparse(x) - linear(x)).abs().max() <= TOL


def test_bad_inputs_are_refused():
    linear = _pruned_linear(8, 16, 0.5)
    sparse = SparseLinear.from_linear(linear)
    with pytest.raises(DiffpruneError, match="inference"):
        sparse(torch.randn(2, 16, requires_grad=True))
    with pytest.raises(DiffpruneError, match="16 input features"):
        sparse(torch.randn(2, 15))
    with pytest.raises(DiffpruneError, match="float32 CPU"):
        sparse(torch.randn(2, 16, dtype=torch.float64))
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(DiffpruneError, match="NaN"):
        SparseLinear.from_linear(linear)


# -- sparsify on a tiny BERT -------------------------------------------------------------------
def _prune(model: nn.Module, sparsity: float) -> None:
    from diffprune.pruning.targets import encoder_linear_weights

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in encoder_linear_weights(model):
            w = params[name]
            k = int(w.numel() * sparsity)
            if k:
                w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0


@pytest.fixture()
def tiny(tiny_model):
    from diffprune.base import load_base

    base = load_base(tiny_model)
    base.model.eval()
    return base


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
@pytest.mark.parametrize("tokens", [(1, 1), (3, 17)])
def test_sparsify_keeps_the_outputs(tiny, sparsity, tokens):
    _prune(tiny.model, sparsity)
    ids = torch.randint(0, 1000, tokens)
    expected = _logits(tiny.model, ids)
    report = sparsify(tiny.model, choose="sparse")
    swapped = [m for m in tiny.model.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == len(report.sparse_layers) == 12  # 2 layers x 6 Linears
    assert (_logits(tiny.model, ids) - expected).abs().max() <= TOL
    assert "12 of 12" in report.summary()


def test_sparsify_keeps_faster_layers_dense(tiny):
    _prune(tiny.model, 0.9)
    report = sparsify(tiny.model, length=16, repeats=3)
    for layer in report.layers:
        if layer.density == 1.0:  # the pooler and the classifier: nothing to time
            assert layer.dense_us is None and layer.kept == "dense"
            continue
        if any(layer.name.startswith(name + ".") for name in report.fused_layers):
            assert layer.kept == "sparse"  # every Linear of a fused layer runs sparse, inside it
            continue
        assert (layer.kept == "sparse") == (layer.sparse_us < 0.95 * layer.dense_us)
    kept_dense = {layer.name for layer in report.layers if layer.kept == "dense"}
    assert {n for n, m in tiny.model.named_modules() if type(m) is nn.Linear} >= kept_dense


def test_sparsify_without_zeros_warns_and_changes_nothing(tiny):
    before = {n: type(m) for n, m in tiny.model.named_modules()}
    with pytest.warns(DiffpruneWarning, match="no pruned Linear"):
        report = sparsify(tiny.model)
    assert {n: type(m) for n, m in tiny.model.named_modules()} == before
    assert report.summary().startswith("no pruned Linear")


def test_sparsify_refuses_nan_and_bad_options(tiny):
    _prune(tiny.model, 0.9)
    with torch.no_grad():
        tiny.model.bert.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(DiffpruneError, match="layer.1.output.dense holds NaN"):
        sparsify(tiny.model, choose="sparse")
    assert not any(isinstance(m, SparseLinear) for m in tiny.model.modules())  # nothing half-converted
    with pytest.raises(DiffpruneError, match="choose"):
        sparsify(tiny.model, choose="fast")
    with pytest.raises(DiffpruneError, match="at least 1"):
        sparsify(tiny.model, batch_size=0)


def test_sparse_model_state_dict_round_trip(tiny):
    _prune(tiny.model, 0.9)
    sparsify(tiny.model, choose="sparse")
    state = tiny.model.state_dict()
    layer = tiny.model.bert.encoder.layer[0].attention.self.query
    assert {"indptr", "indices", "values", "bias"} <= {k.rsplit(".", 1)[1] for k in state if ".query." in k}
    ids = torch.randint(0, 1000, (2, 9))
    before = _logits(tiny.model, ids)
    tiny.model.load_state_dict(state)
    assert torch.equal(_logits(tiny.model, ids), before)
    assert layer.weight_bytes() == 4 * (32 + 1) + (2 + 4) * layer.nnz  # int32 rows, int16 columns, fp32 values


# -- speed and the CLI -------------------------------------------------------------------------
def test_speed_checks_its_inputs(tiny):
    from diffprune.sparse.speed import check_threads, random_inputs

    with pytest.raises(DiffpruneError, match="threads must be between 1"):
        check_threads(0)
    with pytest.raises(DiffpruneError, match="beyond this model's limit of 160"):
        random_inputs(tiny, 1, 161)
    with pytest.raises(DiffpruneError, match="at least 1"):
        random_inputs(tiny, 0, 8)


def _invoke(*args):
    from diffprune.cli import main

    return CliRunner().invoke(main, list(args), prog_name="diffprune")


def test_speed_command_on_a_model_folder(tiny, tmp_path):
    _prune(tiny.model, 0.9)
    tiny.model.save_pretrained(tmp_path / "pruned")
    tiny.tokenizer.save_pretrained(tmp_path / "pruned")
    result = _invoke("speed", str(tmp_path / "pruned"), "--length", "16", "--repeats", "3", "--threads", "1",
                     "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["max_abs_diff"] <= TOL and record["dense_ms"] > 0 and record["sparse_ms"] > 0
    assert len(record["layers"]) == 14  # 12 encoder Linears, the pooler and the classifier
    assert set(record["model_ms"]) == {"linears", "fused"} and record["fused_layers"] in ([], [
        "bert.encoder.layer.0", "bert.encoder.layer.1"])  # fused where the whole model ran faster
    bad = _invoke("speed", str(tmp_path / "pruned"), "--threads", "0")
    assert bad.exit_code == 1 and "threads must be between 1" in bad.stderr


def test_eval_sparse_gives_the_dense_scores(tiny, tmp_path):
    from diffprune.patch import TaskPatch
    from diffprune.pruning.targets import encoder_linear_weights

    g = torch.Generator().manual_seed(0)
    params = tiny.base_parameters()
    masks = {n: torch.rand(params[n].shape, generator=g) < 0.9 for n in encoder_linear_weights(tiny.model)}
    head = {n: torch.randn(p.shape, generator=g) for n, p in tiny.head_parameters().items()}
    meta = {"base": tiny.name, "fingerprint": tiny.fingerprint, "task": "MRPC", "method": "random-mask",
            "base_params": tiny.num_base_params, "max_seq_length": 32}
    TaskPatch.from_masks(masks, head, meta).save(tmp_path / "p.safetensors")
    scores = []
    for extra in ([], ["--sparse"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = _invoke("eval", "--patch", str(tmp_path / "p.safetensors"), "--data-dir", str(GLUE_FIXTURES),
                             "--json", *extra)
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout))
    assert scores[0] == scores[1]


def test_a_pruning_run_scores_the_same_sparse_and_times_from_run_and_patch(tiny_model, tmp_path):
    """A run of a diffprune method (gradual magnitude pruning at 90%: a learned pattern, rows
    of uneven counts) through the run folder and through its patch file."""
    from conftest import train_in_process
    from diffprune import api
    from diffprune.sparse import load_sparse

    train_in_process(tmp_path, tiny_model, "magnitude", {"sparsity": 0.9, "pruning_events": 2})
    dense = api.evaluate_run(tmp_path, str(GLUE_FIXTURES))
    assert api.evaluate_run(tmp_path, str(GLUE_FIXTURES), sparse=True) == dense
    for source in (tmp_path, tmp_path / "patch.safetensors"):
        result = _invoke("speed", str(source), "--length", "8", "--repeats", "3", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["max_abs_diff"] <= TOL
    base, report = load_sparse(tmp_path / "patch.safetensors", length=8)
    assert sum(layer.density < 1 for layer in report.layers) == 12


def test_wide_column_indices_give_the_same_outputs():
    """Inputs wider than 32,768 features store column indices in 4 bytes: the same kernel path."""
    linear = _pruned_linear(24, 40, 0.7)
    narrow = SparseLinear.from_linear(linear)
    wide = SparseLinear(40, 24, narrow.indptr.numpy(), narrow.indices.numpy().astype("int32"),
                        narrow.values.numpy(), linear.bias)
    for tokens in (3, 70):
        x = torch.randn(tokens, 40)
        with torch.no_grad():
            assert torch.equal(wide(x), narrow(x))
            assert (wide(x) - linear(x)).abs().max() <= TOL
