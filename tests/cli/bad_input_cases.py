"""The bad-input table: every row is a command a user might type, the exit code it must give and
a regex its one error line must match (the key or file, and what would be right).

Exit code 2 = the input is wrong (fix the command, the config or the files); 1 = a fault found
while running (e.g. a damaged shard's token ids). `build_fixtures` (bad_input_fixtures.py) writes
the files the rows name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple          # argv with {placeholders} (see build_fixtures); {id} is the row's id
    code: int
    match: str           # regex the one error line must contain (re.search)

    def argv(self, paths: dict) -> list[str]:
        return [a.format(**paths, id=self.id) for a in self.args]


# A model and data small enough that a row that must get past the config to fail costs ~a second.
SMALL = ("--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "2",
         "--model.max_seq_len", "64", "--train.seq_len", "16", "--train.batch_size", "2", "--train.steps", "1",
         "--train.device", "cpu", "--metrics.progress", "false", "--metrics.tensorboard", "false")
TRAIN = ("train", "--config", "{tiny}", "--run.dir", "{w}/runs/{id}", "--data.urls", "{shards}", *SMALL)
GEN = ("generate", "--config", "{tiny}", "--run.dir", "{run}", "--data.urls", "{shards}", *SMALL)


def train(id, *extra, code=2, match):
    return Case(id, (*TRAIN, *extra), code, match)


def gen(id, *extra, code=2, match):
    return Case(id, (*GEN, *extra), code, match)


def cmd(id, *args, code=2, match):
    return Case(id, args, code, match)


CASES = [
    # ---- train: the config file and override syntax
    cmd("train-config-missing", "train", "--config", "{w}/nope.toml", match=r"config file .*nope.toml.* not found"),
    cmd("train-config-not-toml", "train", "--config", "{bad_toml}", match=r"bad.toml.* not valid TOML"),
    train("train-unknown-key", "--optim.lrr", "1", match=r"unknown key optim.lrr, did you mean 'lr'"),
    train("train-unknown-section", "--optimm.lr", "1", match=r"unknown section 'optimm'.*did you mean 'optim'"),
    train("train-override-no-value", "--optim.lr", match=r"--optim.lr needs a value"),
    train("train-not-a-number", "--optim.lr", "fast", match=r"optim.lr: expected a number, got 'fast'"),
    train("train-not-an-int", "--train.steps", "1.5", match=r"train.steps: expected an integer"),
    train("train-bad-choice", "--model.activation", "relu", match=r"model.activation: 'relu' is not allowed; expected one of"),
    # ---- train: values out of range (validate())
    train("train-steps-0", "--train.steps", "0", match=r"train.steps: must be >= 1"),
    train("train-threads-negative", "--train.threads", "-2", match=r"train.threads: .*>= 0"),
    train("train-eps-negative", "--optim.eps", "-1e-8", match=r"optim.eps: .*> 0"),
    train("train-eps-zero", "--optim.eps", "0", match=r"optim.eps: .*> 0"),
    # non-finite values (validated by the nansync work, issue 17's divergence part)
    train("train-lr-nan", "--optim.lr", "nan", match=r"optim.lr: .*(finite|> 0)"),
    train("train-lr-inf", "--optim.lr", "inf", match=r"optim.lr: .*(finite|> 0)"),
    train("train-rope-theta-0", "--model.rope_theta", "0", match=r"model.rope_theta: .*> 0"),
    train("train-beta1-1", "--optim.beta1", "1.0", match=r"optim.beta1.*\[0, 1\)"),
    train("train-cpu-peak-0", "--metrics.cpu_peak_tflops", "0", match=r"metrics.cpu_peak_tflops: .*> 0"),
    train("train-peak-negative", "--metrics.peak_tflops", "-5", match=r"metrics.peak_tflops: .*>= 0"),
    train("train-seed-negative", "--run.seed", "-1", match=r"run.seed: .*>= 0"),
    train("train-mup-no-base", "--model.parametrization", "mup",
          match=r"model.mup_base_dim: must be >= 1 with parametrization = 'mup'"),
    # experiment trackers (metrics.wandb / metrics.mlflow; trainer/trackers.py)
    train("train-wandb-mode", "--metrics.wandb_mode", "cloud",
          match=r"metrics.wandb_mode: 'cloud' is not allowed; expected one of 'auto', 'offline', 'online'"),
    train("train-wandb-no-project", "--metrics.wandb", "true", "--metrics.wandb_project", "",
          match=r"metrics.wandb_project: must name a W&B project"),
    train("train-mlflow-no-experiment", "--metrics.mlflow", "true", "--metrics.mlflow_experiment", " ",
          match=r"metrics.mlflow_experiment: must name an MLflow experiment"),
    train("train-seq-gt-max", "--train.seq_len", "128", match=r"train.seq_len: 128 exceeds model.max_seq_len=64"),
    train("train-moe-top-k", "--model.moe_experts", "4", "--model.moe_top_k", "5",
          match=r"model.moe_top_k: must be between 1 and model.moe_experts = 4, got 5"),
    train("train-moe-every", "--model.moe_experts", "4", "--model.moe_every", "2",
          match=r"model.moe_every: must be between 1 and model.n_layers = 1"),
    train("train-moe-router", "--model.moe_experts", "4", "--model.moe_router", "relu",
          match=r"model.moe_router: 'relu' is not allowed; expected one of"),
    train("train-moe-bias", "--model.moe_experts", "4", "--model.bias", "true",
          match=r"model.bias: experts have no biases"),
    train("train-moe-capacity", "--model.moe_experts", "4", "--model.moe_capacity_factor", "-1",
          match=r"model.moe_capacity_factor: must be >= 0"),
    train("train-dim-heads", "--model.n_heads", "3", "--model.n_kv_heads", "3",
          match=r"model.dim: 32 is not divisible by model.n_heads=3"),
    train("train-vocab-small", "--model.vocab_size", "100", match=r"model.vocab_size: 100 is smaller .*at least 257"),
    train("train-keep-0", "--checkpoint.keep", "0", match=r"checkpoint.keep: must be >= 1"),
    train("train-at-steps-beyond", "--checkpoint.at_steps", "[5]", match=r"checkpoint.at_steps: .*5.*train.steps=1"),
    train("train-decay-beyond", "--optim.schedule", "wsd", "--optim.decay_steps", "10",
          match=r"optim.decay_steps: 10 .*train.steps=1"),
    train("train-pp-microbatches-negative", "--parallel.pp_microbatches", "-1", match=r"parallel.pp_microbatches: .*>= 0"),
    train("train-pp-layers-0", "--parallel.pp_layers", "[1, 0]", match=r"parallel.pp_layers: .*>= 1"),
    train("train-tp-2-world-1", "--parallel.tp", "2", match=r"parallel"),
    train("train-cp-2-world-1", "--parallel.cp", "2",
          match=r"parallel: pp\*dp_replicate\*cp\*tp = 2 does not divide the world size 1"),
    train("train-cp-deepspeed", "--parallel.engine", "deepspeed", "--parallel.cp", "2",
          match=r"parallel.cp: context parallel runs under parallel.engine = torch only"),
    train("train-cp-kv-unknown", "--parallel.cp_kv", "mesh", match=r"parallel.cp_kv"),
    train("train-ds-tp", "--parallel.engine", "deepspeed", "--parallel.tp", "2",
          match=r"parallel.engine = deepspeed: .*parallel.tp, parallel.pp and parallel.dp_replicate to 1"),
    train("train-ds-zero-stage-4", "--parallel.engine", "deepspeed", "--parallel.zero_stage", "4",
          match=r"parallel.zero_stage: must be 0, 1, 2 or 3, got 4"),
    train("train-ds-offload-param-stage-2", "--parallel.engine", "deepspeed", "--parallel.offload_param", "cpu",
          match=r"parallel.offload_param: 'cpu' needs parallel.zero_stage = 3"),
    train("train-ds-nvme-no-path", "--parallel.engine", "deepspeed", "--parallel.zero_stage", "3",
          "--parallel.offload_param", "nvme", match=r"parallel.nvme_path: NVMe offload needs a folder"),
    train("train-ds-native-not-deepspeed", "--checkpoint.deepspeed_native", "true",
          match=r"checkpoint.deepspeed_native: .*needs parallel.engine = deepspeed \(got 'torch'\)"),
    train("train-ds-async-save", "--parallel.engine", "deepspeed", "--checkpoint.async", "true",
          match=r"checkpoint.async: not built yet for parallel.engine = deepspeed; use false"),
    train("train-ds-config-missing", "--parallel.engine", "deepspeed", "--checkpoint.every", "0", "--checkpoint.final",
          "false", "--parallel.deepspeed_config", "{w}/no-such-ds.json",
          match=r"parallel.deepspeed_config: .*no-such-ds.json is not a file"),
    train("train-ds-world-1", "--parallel.engine", "deepspeed", "--checkpoint.every", "0", "--checkpoint.final", "false",
          match=r"parallel.engine = deepspeed: needs a process group of 2 or more ranks"),
    train("train-every-minutes-negative", "--checkpoint.every_minutes", "-1", match=r"checkpoint.every_minutes.*>= 0"),
    train("train-eot-token-bytes", "--data.eot_token", "</s>", match=r"data.eot_token: .*hf:"),
    train("train-device-cuda", "--train.device", "cuda", match=r"train.device: 'cuda' .*no CUDA device.*'cpu'"),
    train("train-memory-check-choice", "--train.memory_check", "maybe",
          match=r"train.memory_check: 'maybe' is not allowed; expected one of"),
    train("train-does-not-fit", "--model.dim", "16384", "--model.n_heads", "16", "--model.n_kv_heads", "16",
          "--model.n_layers", "64", match=r"train.memory_check: this run needs about .* GiB is available"),
    train("train-weights-count", "--data.weights", "[1.0, 2.0]", match=r"data.weights: 2 weights for 1 urls"),
    train("train-hf-tokenizer-missing", "--data.tokenizer", "hf:{w}/no/tokenizer.json",
          match=r"data.tokenizer: no tokenizer file at .*no/tokenizer.json"),
    train("train-master-port", "--launch.master_port", "70000", match=r"launch.master_port"),
    train("train-accelerate-config-missing", "--accelerate-config", "{w}/nope.yaml",
          match=r"launch.accelerate_config: .*nope.yaml.* not found"),
    train("train-accelerate-config-not-yaml", "--accelerate-config", "{bad_toml}", match=r"bad.toml.* not valid YAML"),
    train("train-accelerate-config-not-mapping", "--launch.accelerate_config", "{a_file}",
          match=r"a_file.* should hold a mapping of accelerate settings"),
    train("train-init-from-missing", "--checkpoint.init_from", "{w}/no-such-ckpt", match=r"no-such-ckpt"),
    # ---- train: the run folder and the data
    train("train-run-dir-is-file", "--run.dir", "{a_file}", match=r"run.dir: .*a_file.* not a folder|run.dir.*a_file"),
    train("train-urls-no-match", "--data.urls", "{w}/nothing/shard-{{000..003}}.tar", match=r"not found: .*shard-000.tar"),
    train("train-urls-missing-file", "--data.urls", "{w}/none.tar", match=r"data shard not found: .*none.tar"),
    train("train-urls-empty-folder", "--data.urls", "{empty_dir}", match=r"folder .*empty.* holds no \*.tar shards"),
    train("train-urls-empty-list", "--data.urls", "{empty_list}", match=r"names no shards"),
    train("train-manifest-missing-shard", "--data.urls", "{missing_shard_dir}",
          match=r"shard-000001.tar.* (listed|named) in .*manifest.json.* (missing|not found)"),
    train("train-manifest-garbled", "--data.urls", "{garbled_manifest_dir}", match=r"manifest .*manifest.json"),
    train("train-manifest-path-missing", "--data.manifest", "{w}/no/manifest.json", match=r"data.manifest: no file at .*no/manifest.json"),
    train("train-text-field", "--data.urls", "{tar_no_manifest}", "--data.text_field", "body",
          match=r"data.text_field"),
    train("train-oov-ids", "--data.urls", "{oov_dir}", "--data.tokenizer", "pretokenized", "--data.shuffle", "false", code=1,
          match=r"shard-000000.tar.*token id 6\d{3}.* vocabulary .*257"),
    train("train-oov-ids-in-worker", "--data.urls", "{oov_dir}", "--data.tokenizer", "pretokenized", "--data.shuffle", "false",
          "--data.num_workers", "1", code=1, match=r"shard-000000.tar.*token id 6\d{3}.* vocabulary"),
    train("train-bad-npy", "--data.urls", "{bad_npy_dir}", "--data.tokenizer", "pretokenized", "--data.shuffle", "false", code=1,
          match=r"shard-000000.tar: sample '\d+' field 'tokens.npy' is not a readable token array"),
    train("train-urls-unknown-file", "--data.urls", "{bad_csv}",
          match=r"cannot read .*bad.csv: unknown file type; accepted: .*\.jsonl.*\.parquet"),
    train("train-jsonl-no-text-field", "--data.urls", "{jsonl_no_text}",
          match=r"no documents: no JSON line .*string field 'text'.*data.text_key"),
    train("train-jsonl-bad-line", "--data.urls", "{bad_jsonl}", match=r"bad.jsonl:2: not a JSON line"),
    train("train-pretokenized-no-manifest", "--data.urls", "{tar_no_manifest}", "--data.tokenizer", "pretokenized",
          match=r"data.tokenizer: 'pretokenized' needs a manifest.json"),
    # ---- prepare
    cmd("prepare-no-inputs", "prepare", "--out", "{w}/p/{id}", match=r"inputs"),
    cmd("prepare-input-missing", "prepare", "{w}/nope.txt", "--out", "{w}/p/{id}", match=r"nope.txt.* not found"),
    cmd("prepare-glob-no-match", "prepare", "{w}/nope*.jsonl", "--out", "{w}/p/{id}", match=r"matches no files"),
    cmd("prepare-out-not-empty", "prepare", "{corpus}", "--out", "{shards}", match=r"--out .* is not empty"),
    cmd("prepare-out-is-file", "prepare", "{corpus}", "--out", "{a_file}", match=r"--out .*a_file.* (is a file|not a folder)"),
    cmd("prepare-bad-tokenizer", "prepare", "{corpus}", "--out", "{w}/p/{id}", "--tokenizer", "nope",
        match=r"tokenizer: 'nope' unknown"),
    cmd("prepare-shard-size-0", "prepare", "{corpus}", "--out", "{w}/p/{id}", "--shard-size-mb", "0",
        match=r"--shard-size-mb.*> 0"),
    cmd("prepare-workers-0", "prepare", "{corpus}", "--out", "{w}/p/{id}", "--workers", "0", match=r"--workers.*>= 1"),
    cmd("prepare-bad-format", "prepare", "{corpus}", "--out", "{w}/p/{id}", "--format", "xml",
        match=r"--format.*invalid choice: 'xml'"),
    # --workers 1: a tokenizer Pool forked inside this driver, after torch has trained here, can
    # deadlock (fork with live threads); a user's `meshformer prepare` is a fresh process.
    cmd("prepare-empty-corpus", "prepare", "{empty_corpus}", "--out", "{w}/p/{id}", "--workers", "1",
        match=r"empty_corpus: no documents .*nothing written"),
    cmd("prepare-bad-jsonl", "prepare", "{bad_jsonl}", "--out", "{w}/p/{id}", "--workers", "1",
        match=r"bad.jsonl:2: not valid JSON"),
    # ---- generate
    gen("generate-empty-prompt", "--prompt", "", match=r"--prompt: empty"),
    gen("generate-prompt-too-long", "--prompt", "x" * 80, match=r"--prompt: 80 tokens.*model.max_seq_len=64"),
    gen("generate-tokens-negative", "--tokens", "-5", match=r"--tokens: .*>= 1"),
    gen("generate-tokens-0", "--tokens", "0", match=r"--tokens: .*>= 1"),
    gen("generate-tokens-too-many", "--prompt", "ab", "--tokens", "100", match=r"--tokens: .*at most 62"),
    gen("generate-temperature-negative", "--temperature", "-1", match=r"--temperature: .*>= 0"),
    gen("generate-top-k-negative", "--top-k", "-3", match=r"--top-k: .*>= 0"),
    gen("generate-tokens-not-int", "--tokens", "many", match=r"--tokens: invalid int value: 'many'"),
    gen("generate-no-checkpoint", "--run.dir", "{empty_dir}", match=r"run folder .*empty.* no complete checkpoint"),
    # generate RUN_DIR: the run folder is enough, and a folder that is not one is named
    cmd("generate-not-a-run-folder", "generate", "{empty_dir}", match=r"empty.* is not a run folder \(no config.toml\)"),
    cmd("generate-run-folder-missing", "generate", "{w}/nope-run", match=r"nope-run.* is not a folder; give a run folder"),
    cmd("generate-run-folder-no-checkpoint", "generate", "{empty_run_with_config}",
        match=r"run folder .*no complete checkpoint under checkpoints/; train it first"),
    cmd("generate-run-and-config", "generate", "{run}", "--config", "{tiny}", match=r"run folder .* or --config .* not both"),
    cmd("generate-no-such-step", "generate", "{run}", "--checkpoint", "step-99",
        match=r"--checkpoint step-99: no complete checkpoint .*step-00000099; this run has: step-00000001"),
    cmd("generate-checkpoint-not-one", "generate", "{run}", "--checkpoint", "{empty_dir}",
        match=r"--checkpoint .*empty.* is not a complete checkpoint folder"),
    gen("generate-other-model", "--model.dim", "64", "--tokens", "5", match=r"(model|shape|dim)"),
    # generate: speculative decoding, quantization, the bandwidth bench (issue 23)
    gen("generate-draft-tokens-0", "--draft", "{run}", "--draft-tokens", "0", match=r"--draft-tokens: 0 must be >= 1"),
    gen("generate-draft-not-a-run", "--draft", "{empty_dir}", "--tokens", "5", match=r"empty.* is not a run folder \(no config.toml\)"),
    gen("generate-quantize-bad", "--quantize", "int4", match=r"--quantize: invalid choice: 'int4'"),
    gen("generate-dtype-bad", "--dtype", "fp16", match=r"--dtype: invalid choice: 'fp16'"),
    gen("generate-batch-sizes-bad", "--bench", "--batch-sizes", "1,x", match=r"--batch-sizes: '1,x'.*e.g. 1,8"),
    gen("generate-batch-sizes-0", "--bench", "--batch-sizes", "0", match=r"--batch-sizes: '0'.*>= 1"),
    # ---- eval
    cmd("eval-not-a-run-folder", "eval", "{empty_dir}", match=r"empty.* is not a run folder \(no config.toml\)"),
    cmd("eval-run-and-config", "eval", "{run}", "--config", "{tiny}", match=r"run folder .* or --config .* not both"),
    cmd("eval-no-val-data", "eval", "{run}", match=r"no validation data.*--data.val_urls PATH or --split train"),
    cmd("eval-train-split-no-batches", "eval", "{run}", "--split", "train",
        match=r"--batches: 0 must be >= 1 \(--split train never ends"),
    cmd("eval-batches-negative", "eval", "{run}", "--batches", "-1", match=r"--batches: -1 must be >= 0"),
    cmd("eval-quantize-bad", "eval", "{run}", "--quantize", "int3", match=r"--quantize: invalid choice: 'int3'"),
    cmd("eval-no-checkpoint", "eval", "{empty_run_with_config}", match=r"no complete checkpoint"),
    # ---- export
    cmd("export-missing-source", "export", "{w}/nothing", "--out", "{w}/x/{id}", match=r"nothing.* does not exist"),
    cmd("export-no-checkpoint", "export", "{empty_run}", "--out", "{w}/x/{id}", match=r"no complete checkpoint"),
    cmd("export-no-out", "export", "{run}", match=r"give a run folder and the output folder.*--out"),
    cmd("export-no-such-step", "export", "{run}", "{w}/x/{id}", "--checkpoint", "7",
        match=r"--checkpoint 7: no complete checkpoint .*step-00000007; this run has: step-00000001"),
    cmd("export-overrides-no-config", "export", "{empty_run}", "{w}/x/{id}", "--data.tokenizer", "bytes",
        match=r"--data.tokenizer bytes: .*empty-run.* has no config.toml to override"),
    cmd("export-three-paths", "export", "{run}", "{w}/x/{id}", "{w}/y", match=r"got 3 path\(s\)"),
    cmd("export-bad-dtype", "export", "{run}", "--out", "{w}/x/{id}", "--dtype", "int8", match=r"--dtype.*'int8'"),
    cmd("export-out-not-empty", "export", "{run}", "--out", "{shards}", match=r"--out .* not empty"),
    cmd("export-out-is-file", "export", "{run}", "--out", "{a_file}", match=r"--out .*a_file.* (is a file|not a folder)"),
    # ---- plan
    cmd("plan-no-cluster", "plan", "--config", "{tiny}", "--gpus", "8", match=r"--cluster"),
    cmd("plan-unknown-cluster", "plan", "--config", "{tiny}", "--cluster", "nosuch", "--gpus", "8",
        match=r"cluster profile 'nosuch' not found"),
    cmd("plan-cluster-pcie-0", "plan", "--config", "{tiny}", "--cluster", "{cluster_no_pcie}", "--gpus", "8",
        match=r"no-pcie.toml: \[host\] memory_gib, memory_gbs and pcie_gbps must be positive"),
    cmd("plan-gpus-0", "plan", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "0", match=r"--gpus: .*>= 1"),
    cmd("plan-gpus-negative", "plan", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "-8",
        match=r"--gpus: .*>= 1"),
    cmd("plan-global-batch-negative", "plan", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "8",
        "--global-batch", "-4", match=r"--global-batch: -4 must be >= 0"),
    cmd("plan-top-0", "plan", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "8", "--top", "0",
        match=r"--top: .*>= 1"),
    cmd("plan-memory-fraction-above-1", "plan", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "8",
        "--max-memory-fraction", "1.5", match=r"--max-memory-fraction: 1.5 must be in \(0, 1\]"),
    cmd("plan-memory-fraction-0", "plan", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "8",
        "--max-memory-fraction", "0", match=r"--max-memory-fraction: 0.0 must be in \(0, 1\]"),
    cmd("plan-batch-tokens-0", "plan", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "8",
        "--global-batch-tokens", "0", match=r"--global-batch-tokens: 0 must be >= 1"),
    cmd("plan-batch-tokens-below-seq", "plan", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "8",
        "--global-batch-tokens", "100", match=r"--global-batch-tokens: 100 is less than one sequence"),
    cmd("plan-config-missing", "plan", "--config", "{w}/nope.toml", "--cluster", "h100-sxm", "--gpus", "8",
        match=r"config file .*nope.toml.* not found"),
    cmd("plan-bad-override", "plan", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "8", "--parallel.tpp", "2",
        match=r"unknown key parallel.tpp"),
    cmd("plan-predict-layout", "plan", "predict", "--config", "{tiny}", "--cluster", "h100-sxm", "--gpus", "12",
        "--parallel.tp", "8", match=r"not divisible by parallel.tp"),
    # ---- slurm
    cmd("slurm-nodes-0", "slurm", "--config", "{tiny}", "--dry-run", "--nodes", "0", match=r"slurm.nodes: must be >= 1"),
    cmd("slurm-time", "slurm", "--config", "{tiny}", "--dry-run", "--time", "soon", match=r"slurm.time: 'soon'"),
    cmd("slurm-profile-missing", "slurm", "--config", "{tiny}", "--dry-run", "--profile", "nowhere",
        match=r"slurm profile 'nowhere' not found"),
    cmd("slurm-template-missing", "slurm", "--config", "{tiny}", "--dry-run", "--template", "{w}/no-template.sh",
        match=r"--template .*no-template.sh: cannot read it \(No such file"),
    cmd("slurm-signal-negative", "slurm", "--config", "{tiny}", "--dry-run", "--signal-seconds", "-5",
        match=r"slurm.signal_seconds"),
    cmd("slurm-array-bad", "slurm", "--config", "{tiny}", "--dry-run", "--array", "zero-seven",
        match=r"--array: 'zero-seven'"),
    cmd("slurm-script-out-dir-missing", "slurm", "--config", "{tiny}", "--dry-run", "--script-out", "{w}/no/dir/job.sh",
        match=r"--script-out .*no/dir/job.sh"),
    # not a dry run: the run folder (where the job log goes) is made before sbatch is called
    cmd("slurm-run-dir-unwritable", "slurm", "--config", "{tiny}", "--run.dir", "{tiny}/run",
        match=r"run.dir: cannot create .*tiny.toml/run for the job log"),
    cmd("slurm-layout", "slurm", "--config", "{tiny}", "--dry-run", "--nodes", "3", "--parallel.dp_replicate", "2",
        match=r"parallel.*3 processes"),
    cmd("slurm-bad-mode", "slurm", "--config", "{tiny}", "--dry-run", "--mode", "mpi", match=r"--mode.*'mpi'"),
    cmd("slurm-stray-option", "slurm", "--config", "{tiny}", "--dry-run", "-x", match=r"unknown option '-x'"),
    # ---- mup
    cmd("mup-no-command", "mup", match=r"(check|command)"),
    cmd("mup-one-width", "mup", "check", "--widths", "64", match=r"--widths '64': give at least two positive widths"),
    cmd("mup-widths-not-numbers", "mup", "check", "--widths", "64,wide", match=r"--widths '64,wide': expected comma-separated integers"),
    cmd("mup-widths-heads", "mup", "check", "--widths", "30,64", match=r"--widths: \[30\] not a multiple of 2 x model.n_heads=4"),
    cmd("mup-steps-0", "mup", "check", "--steps", "0", match=r"--steps 0: must be >= 1"),
    # ---- sweep
    cmd("sweep-mup-base-0", "sweep", "plan", "{sweep_mup_bad}", match=r"\[mup\] base_dim = 0: must be a positive width"),
    cmd("sweep-spec-missing", "sweep", "plan", "{w}/nope-sweep.toml", match=r"nope-sweep.toml does not exist"),
    cmd("sweep-spec-not-toml", "sweep", "plan", "{bad_toml}", match=r"bad.toml.* not valid TOML"),
    cmd("sweep-spec-bad-value", "sweep", "plan", "{sweep_bad_budget}", match=r"budgets must be a non-empty list of positive"),
    cmd("sweep-no-subcommand", "sweep", match=r"(command|plan|run)"),
    cmd("sweep-jobs-0", "sweep", "run", "{sweep_spec}", "--jobs", "0", match=r"--jobs: .*>= 1"),
    cmd("sweep-fit-csv-missing", "sweep", "fit", "--csv", "{w}/nope.csv", match=r"points file .*nope.csv cannot be read \(No such file"),
    cmd("sweep-fit-csv-not-numbers", "sweep", "fit", "--csv", "{bad_csv}", "--out", "{w}/fit-{id}.json",
        match=r"bad.csv: line 3, column 'loss': 'lots' is not a number"),
    cmd("sweep-fit-nothing", "sweep", "fit", match=r"give a sweep spec or --csv"),
    cmd("sweep-fit-bootstrap-negative", "sweep", "fit", "--csv", "{good_csv}", "--bootstrap", "-1",
        "--out", "{w}/fit-{id}.json", match=r"--bootstrap: .*>= 0"),
    cmd("sweep-plot-nothing", "sweep", "plot", match=r"plot: give a sweep spec, or --csv FILE and --fit FILE"),
    cmd("sweep-exec-before-plan", "sweep", "exec", "{sweep_spec}", "--run-id", "nope",
        match=r"sweep exec: .*plan.json not found: run `sweep plan` or `sweep run`"),
    # ---- the top level
    cmd("unknown-command", "trian", match=r"unknown command 'trian'"),
]
