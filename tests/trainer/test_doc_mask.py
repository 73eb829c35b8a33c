"""Document masking and sliding-window attention (model.doc_mask, model.attn_window): what the
masks promise, checked against independent constructions."""
import pytest
import torch
import torch.nn.functional as F

from core.errors import UsageError
from core.model_config import ModelConfig
from trainer.attention import AttentionCore, AttnMask, doc_ids
from trainer.generate import generate
from tests.trainer.fixtures import one_thread  # noqa: F401  (a fixture: used by pytestmark)
from trainer.model import KVCache, Transformer

EOT = 7


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, dim=32, n_layers=2, n_heads=2, max_seq_len=64, eot_id=EOT)
    return Transformer(ModelConfig(**{**cfg, **kw})).double()


def test_doc_ids_end_documents_after_eot():
    positions, doc = doc_ids(torch.tensor([[5, 1, EOT, 2, EOT, EOT, 3]]), EOT)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 3]]


@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal", "alibi", "relative"])
def test_packed_row_equals_its_documents_alone(position):
    """Loss summed over a packed row under doc_mask == the documents' losses, each run alone from
    position 0, and so are the gradients. fp64: both sides sum the same terms in another order,
    so they agree to ~1e-15 relative per op; 1e-10 leaves 5 orders of margin and still fails on
    any leak (a leaked key shifts a logit by ~init_std^2 ~ 1e-4)."""
    model = tiny(position=position, doc_mask=True)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(8, 32, (n,), generator=g) for n in (5, 9, 3)]
    row = torch.cat([torch.cat([d, torch.tensor([EOT])]) for d in docs])        # each doc then end-of-text
    inputs, labels = row[None, :-1], row[None, 1:]

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    packed = loss_and_grads(lambda: F.cross_entropy(model(inputs)[0], labels[0], reduction="sum"))
    bounds = torch.cumsum(torch.tensor([0] + [len(d) + 1 for d in docs]), 0).tolist()

    def alone():
        total = 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            seg_in, seg_lab = inputs[:, a:b], labels[:, a:b]          # the last doc's eot has no label
            if seg_in.shape[1]:
                total = total + F.cross_entropy(model(seg_in)[0], seg_lab[0], reduction="sum")
        return total

    separate = loss_and_grads(alone)
    assert torch.allclose(packed[0], separate[0], rtol=1e-10, atol=0)
    for gp, gs in zip(packed[1], separate[1]):
        assert torch.allclose(gp, gs, rtol=1e-10, atol=1e-14)
    # and the mask matters: without it the same row's loss differs
    plain = tiny(position=position)
    assert not torch.allclose(F.cross_entropy(plain(inputs)[0], labels[0], reduction="sum"), packed[0], rtol=1e-6)


def explicit_window(t: int, window: int) -> torch.Tensor:
    """Boolean [t, t]: causal band of width `window`, built without AttnMask."""
    return torch.ones(t, t, dtype=torch.bool).tril().triu(-(window - 1))


def test_sliding_window_equals_full_attention_with_the_explicit_mask():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(12)
    mask = AttnMask(pos, pos, aligned=True, window=4)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=explicit_window(12, 4))
    assert torch.allclose(AttentionCore(None)(q, k, v, mask), want, rtol=1e-12, atol=1e-12)
    out, _ = AttentionCore(None).block(q, k, v, mask)     # the context-parallel block path agrees
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)
    # split into two key blocks merged by log-sum-exp, as a ring would (with document ids on the way)
    doc = torch.zeros(2, 12, dtype=torch.long)
    dmask = AttnMask(pos, pos, window=4, q_doc=doc, k_doc=doc)
    (o1, l1), (o2, l2) = (AttentionCore(None).block(q, k[:, :, s], v[:, :, s], dmask.keys(pos[s], doc[:, s]))
                          for s in (slice(0, 6), slice(6, 12)))
    lse = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]
    assert torch.allclose(merged, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="k_doc"):
        dmask.keys(pos)


def test_windowed_model_layers_follow_attn_global_every():
    m = tiny(attn_window=3, attn_global_every=2, n_layers=4)
    assert [layer.attention.window for layer in m.layers.values()] == [3, None, 3, None]


def test_windowed_generate_keeps_flat_cache_and_matches_recompute():
    """Cached decoding == running the whole sequence again at each step (logits to 1e-10, fp64),
    and a windowed layer's cache holds window - 1 positions however long the sequence."""
    window, layers = 4, 3
    m = tiny(attn_window=window, attn_global_every=3, n_layers=layers).eval()
    prompt = torch.randint(8, 32, (1, 5), generator=torch.Generator().manual_seed(3))
    cache, sizes = KVCache(), []
    with torch.no_grad():
        logits = m(prompt, cache=cache)[:, -1]
        seq = prompt
        for _ in range(20):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logits = m(nxt, start_pos=seq.shape[1] - 1, cache=cache)[:, -1]
            assert torch.allclose(logits, m(seq)[:, -1], rtol=1e-10, atol=1e-10)
            sizes.append({layer: t.shape[1] for layer, t in cache.k.items()})
    assert all(s[0] == s[1] == window - 1 for s in sizes)              # windowed layers: flat
    assert [s[2] for s in sizes] == list(range(6, 26))                  # the global layer: everything
    assert len(cache) == 25
    assert cache.attended() == (window + window + 25) / 3      # what a step reads, for decode_bench
    out = generate(m, prompt, 20, temperature=0)
    assert torch.equal(out, seq)


def test_generate_refuses_a_prompt_spanning_documents():
    m = tiny(doc_mask=True).eval()
    with pytest.raises(UsageError, match="end-of-text"):
        generate(m, torch.tensor([[9, EOT, 10]]), 2, temperature=0)


def test_meshformer_train_and_generate_with_doc_mask_and_window(tmp_path, capsys):
    """`meshformer train` on the built-in corpus (packed Python files, each ending in end-of-text)
    with both switches, then `meshformer generate` from the run folder on the windowed cache."""
    from trainer.cli import main
    run = tmp_path / "run"
    tiny_run = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--model.n_kv_heads", "2",
                "--model.max_seq_len", "64", "--train.seq_len", "64", "--train.batch_size", "2", "--train.steps", "3",
                "--train.device", "cpu", "--train.threads", "1", "--train.eval_every", "0", "--metrics.progress",
                "false", "--metrics.tensorboard", "false", "--checkpoint.every", "0", "--optim.warmup_steps", "1"]
    switches = ["--model.doc_mask", "true", "--model.attn_window", "8", "--model.attn_global_every", "2"]
    assert main(["train", "--config", "configs/tiny.toml", *tiny_run, *switches, "--run.dir", str(run)]) == 0
    assert "step 3/3" in capsys.readouterr().out
    saved = (run / "config.toml").read_text()
    assert "eot_id = 256" in saved and "attn_window = 8" in saved     # generate/export read them back
    assert main(["generate", str(run), "--prompt", "def ", "--tokens", "40", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_given_doc_ids_match_the_models_own_and_positions_alone_are_refused():
    """What a context-parallel engine passes (doc ids and positions of whole rows) gives what the
    model computes itself; positions without doc ids (a chunk numbered on its own) are refused."""
    m = tiny(doc_mask=True).eval()
    row = torch.tensor([[9, 10, 11, EOT, 12, 13, EOT, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        whole = m(row)
        positions, doc = doc_ids(row, EOT)
        assert torch.allclose(m(row, positions=positions, doc=doc), whole, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="pass `doc` with `positions`"):
            m(row[:, 6:], positions=positions[:, 6:])
