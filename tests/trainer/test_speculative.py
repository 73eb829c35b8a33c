"""Speculative decoding keeps the target's output: greedy exactly, sampling in distribution."""
import pytest
import torch
from scipy.stats import chi2

from core.errors import UsageError
from core.model_config import ModelConfig
from trainer.generate import generate
from tests.trainer.fixtures import one_thread  # noqa: F401  (a fixture: used by pytestmark)
from trainer.model import KVCache, Transformer
from trainer.speculative import check_same_vocab, next_token_probs, speculative_generate, verify

FALSE_FAILURE = 1e-6    # probability that a correct rule fails a chi-square test below


pytestmark = pytest.mark.usefixtures("one_thread")


def model(seed: int, vocab: int = 64, dim: int = 32, layers: int = 2, logit_scale: float = 1.0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=2, max_seq_len=64)).eval()
    with torch.no_grad():
        m.output.weight.mul_(logit_scale)   # random init gives near-uniform logits; scale them apart
    return m


def noisy_copy(m: Transformer, seed: int, std: float) -> Transformer:
    """A draft that agrees with the target often but not always (both branches of the rule run)."""
    d = Transformer(m.cfg).eval()
    d.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return d


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


def test_kv_cache_truncate_forgets_the_tail():
    m = model(0)
    cache, seq = KVCache(), torch.randint(0, 64, (1, 9))
    m(seq[:, :6], start_pos=0, cache=cache)
    cache.truncate(4)
    assert len(cache) == 4
    rolled = m(seq[:, 4:], start_pos=4, cache=cache)[:, -1]
    assert torch.allclose(rolled, m(seq)[:, -1], atol=1e-5)


def test_greedy_speculative_equals_plain_greedy_on_20_prompts():
    # float64: the verify pass scores k+1 positions at once, plain decoding one; in float64 their
    # rounding differences (~1e-16) cannot flip an argmax, so any difference is the algorithm's.
    target = model(1, layers=1, logit_scale=10.0).double()
    drafts = {"noisy copy": noisy_copy(target, 2, 0.05), "itself": target}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (1, int(n)), generator=g) for n in torch.randint(1, 9, (20,), generator=g)]
    counts = {name: [0, 0] for name in drafts}   # accepted, drafted
    for i, prompt in enumerate(prompts):
        plain = generate(target, prompt, 16, temperature=0)
        for name, draft in drafts.items():
            spec, stats = speculative_generate(target, draft, prompt, 16, draft_tokens=1 + i % 4, temperature=0)
            assert torch.equal(spec, plain), (name, i)
            assert stats.emitted == 16 and stats.target_passes == len(stats.rounds)
            counts[name][0] += stats.accepted
            counts[name][1] += stats.drafted
    rates = {name: a / d for name, (a, d) in counts.items()}
    assert rates["itself"] == 1.0 and 0 < rates["noisy copy"] < 1, rates   # accept, reject and bonus paths ran


def test_verify_keeps_the_target_distribution():
    """First emitted token over N independent draws: chi-square against p, df = V - 1."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02], dtype=torch.float64)
    q = torch.tensor([0.05, 0.05, 0.10, 0.30, 0.05, 0.25, 0.10, 0.10], dtype=torch.float64)
    n, v = 200_000, len(p)
    drafts = torch.multinomial(q.expand(n, v), 1, replacement=True, generator=g)[:, 0]
    accepted, replacement = verify(p.expand(n, v), q.expand(n, v), drafts, g)
    first = torch.where(accepted, drafts, replacement)
    limit = chi2.isf(FALSE_FAILURE, v - 1)
    assert chi_square(torch.bincount(first, minlength=v).double(), p) < limit
    # the test can fail: the drafts alone (distribution q) are far above the limit
    assert chi_square(torch.bincount(drafts, minlength=v).double(), p) > limit
    # and the acceptance rate is its expectation sum_x min(p, q) (Leviathan et al., 3.3) within 6 sigma
    rate = torch.minimum(p, q).sum()
    assert abs(accepted.double().mean() - rate) < 6 * (rate * (1 - rate) / n) ** 0.5


def test_sampled_speculative_first_token_follows_the_target():
    """End to end through both models and caches: the first new token's distribution is the target's."""
    target, draft = model(4, vocab=8, logit_scale=5.0), model(5, vocab=8, dim=16, logit_scale=5.0)
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        p = next_token_probs(target(prompt)[0, -1], 1.0, 0).double()
        q = next_token_probs(draft(prompt)[0, -1], 1.0, 0).double()
    n, limit = 300, chi2.isf(FALSE_FAILURE, 7)
    # power: samples from q would exceed the limit in expectation by far (E[chi2] ~ n * sum (q-p)^2/p)
    assert n * float(((q - p) ** 2 / p).sum()) > 3 * limit
    assert float(n * p.min()) >= 5      # chi-square's approximation holds
    g = torch.Generator().manual_seed(0)
    first = torch.tensor([int(speculative_generate(target, draft, prompt, 2, 1, 1.0, 0, g)[0][0, 3])
                          for _ in range(n)])
    assert chi_square(torch.bincount(first, minlength=8).double(), p) < limit


def test_draft_with_another_vocabulary_is_refused():
    with pytest.raises(UsageError, match="--draft: .*vocab_size=32.*differs"):
        check_same_vocab(64, 32, "bytes", "bytes")
    with pytest.raises(UsageError, match="--draft: its tokenizer 'hf:a.json'"):
        check_same_vocab(64, 64, "bytes", "hf:a.json")
