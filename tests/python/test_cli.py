"""The veloxquant command-line tool end to end on the real model.

Needs:
  VQ_CLI         path to the built veloxquant binary (tests skip when unset or absent)
  VQ_GGUF_MODEL  optional model path (default: <repo>/models/SmolLM2-135M-Instruct.Q4_1.gguf;
                 tests that load it skip when it is missing)
The texts are written by the tests, so the shared WikiText-2 copy is not needed.
"""
import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = pathlib.Path(os.environ.get("VQ_GGUF_MODEL",
                                    ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
SUBCOMMANDS = ["generate", "eval", "compare", "info"]
PARAGRAPH = ("In {year} the council of the town of {name} voted to build a new bridge over the "
             "river. The work took {n} years and cost more than expected, but the bridge still "
             "carries the main road north. Local historians note that the old ferry, which it "
             "replaced, had run since the middle ages.\n")


@pytest.fixture(scope="module")
def cli():
    path = os.environ.get("VQ_CLI")
    if not path:
        pytest.skip("VQ_CLI is not set")
    if not os.access(path, os.X_OK):
        pytest.skip(f"VQ_CLI={path} is not an executable")
    return path


@pytest.fixture(scope="module")
def model():
    if not MODEL.exists():
        pytest.skip(f"{MODEL} not present")
    return str(MODEL)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    names = ["Arden", "Belmont", "Carrow", "Dunmore", "Eskdale", "Fenwick", "Garth", "Holm"]
    body = "".join(PARAGRAPH.format(year=1700 + 7 * i, name=names[i % len(names)], n=2 + i % 5)
                   for i in range(40))
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(body, encoding="utf-8")
    return str(path)


def run(cli, *args, check=True):
    proc = subprocess.run([cli, *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help(cli, sub):
    out = run(cli, sub, "--help").stdout
    assert "--json" in out
    if sub != "info":
        assert "--quiet" in out and "--ctx" in out
    if sub in ("generate", "eval"):
        for flag in ("--method", "--bits", "--value-bits", "--num-residuals", "--sketch-dim",
                     "--num-clusters", "--no-hadamard", "--unfused", "--outliers",
                     "--outlier-bits", "--seed", "--model"):
            assert flag in out, flag


def test_info_json(cli, model, tmp_path):
    path = tmp_path / "info.json"
    out = run(cli, "info", "--model", model, "--json", str(path)).stdout
    assert "Q4_1" in out
    doc = json.loads(path.read_text())
    hp = doc["hparams"]
    assert hp["n_layer"] == 30 and hp["n_head"] == 9 and hp["n_head_kv"] == 3
    assert hp["head_dim"] == 64 and hp["n_vocab"] == 49152
    assert sum(doc["tensor_types"].values()) == doc["tensor_count"] == 272
    assert doc["weight_bytes"] > 50e6
    caches = {c["label"]: c for c in doc["kv_caches"]}
    fp16 = caches["fp16 (baseline)"]
    assert fp16["key_bits_per_coordinate"] == 16 and fp16["value_bits_per_coordinate"] == 16
    assert fp16["kv_bytes_per_token"] == 30 * 3 * 64 * 2 * 2
    tq4 = caches["turboquant_rvq b=4 r=1 v=4"]
    assert tq4["kv_bytes_per_token"] < fp16["kv_bytes_per_token"] / 3


def check_quality(row, baseline):
    for key in ("label", "config", "tokens_scored", "kld", "top1", "ppl", "ppl_base",
                "delta_ppl", "kv_mib", "footprint", "seconds"):
        assert key in row, key
    for key in ("tokens", "storage_bytes", "kv_bytes_per_token", "key_bits_per_coordinate",
                "value_bits_per_coordinate", "bits_per_coordinate"):
        assert key in row["footprint"], key
    assert 0 <= row["top1"] <= 1 and row["kld"] >= 0
    assert row["ppl_base"] == pytest.approx(baseline["ppl"])


def test_eval_quick_json(cli, model, text, tmp_path):
    path = tmp_path / "eval.json"
    run(cli, "eval", "--quick", "--needle", "--needle-lengths", "320", "--quiet", "--model",
        model, "--text", text, "--method", "turboquant_rvq", "--bits", "4", "--num-residuals",
        "1", "--value-bits", "4", "--json", str(path))
    doc = json.loads(path.read_text())
    assert doc["ctx"] == 256 and doc["chunks"] == 1 and doc["score_from"] == 128
    assert doc["tokens_scored"] == 128
    base, res = doc["baseline"], doc["result"]
    check_quality(base, base)
    check_quality(res, base)
    assert base["kld"] == 0 and base["top1"] == 1
    assert res["config"]["method"] == "turboquant_rvq" and res["config"]["bits"] == 4
    assert 0 < res["kld"] < 0.5
    assert res["footprint"]["kv_bytes_per_token"] < base["footprint"]["kv_bytes_per_token"] / 2
    needle = doc["needle"]
    assert needle["lengths"] == [320] and needle["depths"] == [0.5]
    for side in ("baseline", "result"):
        cases = needle[side]["cases"]
        assert len(cases) == 1 and len(cases[0]["number"]) == 5
        assert needle[side]["score"] == float(cases[0]["found"])


def test_compare_quick_json_and_plot(cli, model, text, tmp_path):
    js, png = tmp_path / "compare.json", tmp_path / "compare.png"
    # --quick, made smaller still: the machine running the tests may be small and shared.
    args = ["compare", "--quick", "--quiet", "--model", model, "--text", text, "--ctx", "128",
            "--needle-lengths", "320", "--decode-contexts", "128", "--methods",
            "turboquant_rvq", "--bits", "4", "--json", str(js)]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(png)]
    except ImportError:
        png = None
    out = run(cli, *args).stdout
    assert "fp16 (baseline)" in out and "tok/s@128" in out
    doc = json.loads(js.read_text())
    assert doc["ctx"] == 128 and doc["tokens_scored"] == 64
    labels = [r["label"] for r in doc["rows"]]
    assert labels == ["fp16 (baseline)", "turboquant_rvq b=1 r=2 v=2 (defaults)",
                      "turboquant_rvq b=4 r=1 v=4"]
    for row in doc["rows"]:
        check_quality(row, doc["rows"][0])
        assert set(row["decode_tokens_per_second"]) == {"128"}
        assert row["decode_tokens_per_second"]["128"] > 0
        assert 0 <= row["needle"]["score"] <= 1
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_streams_text(cli, model, tmp_path):
    path = tmp_path / "gen.json"
    proc = run(cli, "generate", "--model", model, "--method", "fp16", "--max-tokens", "8",
               "--quiet", "--json", str(path), "What is the capital of France?")
    doc = json.loads(path.read_text())
    assert 0 < doc["generated_tokens"] <= 8
    assert proc.stdout.strip() == doc["text"].strip() != ""
    assert "Paris" in doc["text"]


def test_generate_warns_where_a_short_first_append_leaves_keys_uncentred(cli, model):
    args = ["generate", "--model", model, "--max-tokens", "2", "--quiet", "--center-keys"]
    short = run(cli, *args, "--raw", "Hello there")  # 2 prompt tokens
    assert "stay uncentred" in short.stderr and "holds 2 tokens" in short.stderr
    chunked = run(cli, *args, "--batch", "8", "What is the capital of France?")
    assert "holds 8 tokens" in chunked.stderr
    templated = run(cli, *args, "What is the capital of France?")  # the chat template's tokens
    assert "uncentred" not in templated.stderr


def test_bad_method_fails_clearly(cli, model, text):
    proc = run(cli, "eval", "--quick", "--model", model, "--text", text, "--method", "nope",
               check=False)
    assert proc.returncode != 0
    assert "--method" in proc.stderr and "nope" in proc.stderr


def test_bad_setting_fails_before_loading(cli, text):
    proc = run(cli, "eval", "--model", "/nonexistent.gguf", "--text", text, "--bits", "9",
               check=False)
    assert proc.returncode != 0
    assert "bits" in proc.stderr and "1..8" in proc.stderr
