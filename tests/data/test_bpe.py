"""data/bpe.py: the byte-level BPE trainer, and the tokenizer it made that configs ship."""

from data.bpe import EOT, train_bpe
from data.tokenizer import HFTokenizer, tokenizer_from_spec

SHIPPED = "configs/tokenizers/stdlib-bpe-1k.json"
TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n    def g(self):\n        return self.x\n",
         "import os\nprint(os.path.join('a', 'b'))  # héllo ✓\n"] * 4


def test_trainer_is_deterministic_has_eot_and_round_trips(tmp_path):
    a, b = train_bpe(TEXTS, 300), train_bpe(TEXTS, 300)
    assert a.to_str() == b.to_str()
    # 256 byte symbols + EOT + merges; a corpus this small may run out of pairs before 300
    assert 257 < a.get_vocab_size() <= 300
    path = tmp_path / "tok.json"
    a.save(str(path))
    tok = HFTokenizer(str(path))
    assert tok.eot_id == a.token_to_id(EOT)
    for text in TEXTS[:3] + ["unseen text: 日本語\t\ttabs\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # merges learnt: the training text takes fewer tokens than bytes
    assert len(tok.encode(TEXTS[1])) < len(TEXTS[1].encode()) / 2


def test_shipped_tokenizer_loads_with_eot_and_merges_indentation():
    tok = tokenizer_from_spec(f"hf:{SHIPPED}")
    assert (tok.vocab_size, tok.eot_id) == (1024, 0)
    text = "    for i in range(10):\n        yield i\n"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_too_small_a_vocabulary_is_one_line_and_exit_2(tmp_path, capsys):
    from data.bpe import main

    assert main(["--vocab", "100", "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vocab 100" in err[0] and "at least 257" in err[0]
    assert not (tmp_path / "t.json").exists()


def test_tiny_moe_and_its_dense_twin_share_the_shipped_tokenizer_and_active_flops():
    import dataclasses

    from core.run_config import load_config
    from trainer.model import Transformer
    moe, dense = load_config("configs/tiny-moe.toml"), load_config("configs/tiny-bpe.toml")
    for cfg in (moe, dense):
        assert cfg.data.tokenizer == f"hf:{SHIPPED}" and cfg.model.vocab_size == 0   # auto: 1024, a multiple of 64
        tok = tokenizer_from_spec(cfg.data.tokenizer, cfg.data.eot_token)
        assert (tok.vocab_size, tok.eot_id) == (1024, 0)
    assert moe.model.moe_experts == 16 and dense.model.moe_experts == 0
    assert dataclasses.replace(moe.model, moe_experts=0, moe_sinkhorn_iters=0, moe_aux_coef=0.01, moe_top_k=2,
                               moe_hidden=0) == dense.model
    # equal active compute: the router (16 x 128 per block) is the only difference, under 1%
    f_moe, f_dense = (Transformer(dataclasses.replace(c.model, vocab_size=1024)).flops_per_token(128)
                      for c in (moe, dense))
    assert 1 < f_moe / f_dense < 1.01
