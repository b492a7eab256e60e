"""Cross-checks our GGUF reader and dequantizers (through tools/gguf_dump) against gguf-py.

gguf-py (the `gguf` package from llama.cpp) is the oracle: its GGUFWriter builds synthetic files,
gguf.quants quantizes and dequantizes, and GGUFReader parses the real model. Needs:
  VQ_GGUF_DUMP   path to the built gguf_dump binary (tests skip when unset)
  VQ_GGUF_MODEL  optional path to SmolLM2-135M-Instruct.Q4_1.gguf (default: <repo>/models/...)
"""
import json
import os
import pathlib
import subprocess

import pytest

np = pytest.importorskip("numpy")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFValueType as VT  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = pathlib.Path(os.environ.get("VQ_GGUF_MODEL",
                                    ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
RTOL = 1e-6

# Types our reader knows (src/model/gguf.h GGMLType) and those dequantize_row supports.
KNOWN = {QT.F32, QT.F16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q8_1, QT.Q2_K,
         QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_K, QT.BF16}
DEQUANTIZABLE = {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K,
                 QT.Q5_K, QT.Q6_K}
# Offsets of the fp16 scale fields in a K-quant block (d, dmin / d), to keep random blocks finite.
K_HALF_FIELDS = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q2_K: (80, 82),
                 QT.Q3_K: (108,)}
VALUE_TYPE_NAMES = ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array",
                    "u64", "i64", "f64"]


@pytest.fixture(scope="module")
def dump_bin():
    path = os.environ.get("VQ_GGUF_DUMP")
    if not path:
        pytest.skip("VQ_GGUF_DUMP is not set")
    if not os.access(path, os.X_OK):
        pytest.skip(f"VQ_GGUF_DUMP={path} is not an executable")
    return path


def run_info(dump_bin, path):
    out = subprocess.run([dump_bin, "info", str(path)], check=True, capture_output=True)
    return json.loads(out.stdout.decode("utf-8"))


def run_dequant(dump_bin, path, name, out_path, rows=None):
    args = [dump_bin, "dequant", str(path), name, str(out_path)]
    if rows is not None:
        args += [str(rows[0]), str(rows[1] - rows[0])]
    subprocess.run(args, check=True, capture_output=True)
    return np.fromfile(out_path, dtype="<f4")


def compare(ours, ref, what):
    """Asserts |ours - ref| <= RTOL * |ref| elementwise; returns (max abs, max rel) errors."""
    ref = np.asarray(ref, dtype=np.float32).ravel()
    assert ours.shape == ref.shape, what
    assert np.array_equal(np.isnan(ours), np.isnan(ref)), what
    ok = ~np.isnan(ref)
    diff = np.abs(ours[ok].astype(np.float64) - ref[ok])
    rel = diff / np.maximum(np.abs(ref[ok]), np.finfo(np.float32).tiny)
    assert np.all(diff <= RTOL * np.abs(ref[ok])), f"{what}: max rel error {rel.max():.3g}"
    return float(diff.max(initial=0.0)), float(rel.max(initial=0.0))


def random_k_blocks(qtype, n_blocks, rng):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in K_HALF_FIELDS[qtype]:
        halves = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return blocks


SYNTH_META = [
    ("t.u8", VT.UINT8, 200), ("t.i8", VT.INT8, -7), ("t.u16", VT.UINT16, 65535),
    ("t.i16", VT.INT16, -32768), ("t.u32", VT.UINT32, 4294967295), ("t.i32", VT.INT32, -5),
    ("t.u64", VT.UINT64, 2**63 - 1), ("t.i64", VT.INT64, -2**63), ("t.f32", VT.FLOAT32, 0.1),
    ("t.f64", VT.FLOAT64, 1e-300), ("t.bool", VT.BOOL, True),
    ("t.str", VT.STRING, "héllo \"quoted\"\n\ttab \u0120x"),
]
SYNTH_ARRAYS = [
    ("t.arr_str", VT.STRING, ["a", "", "Ġthe", "\\"]), ("t.arr_i32", VT.INT32, [-1, 2, 3]),
    ("t.arr_u8", VT.UINT8, [0, 255]), ("t.arr_i64", VT.INT64, [-2**63, 2**63 - 1]),
    ("t.arr_f32", VT.FLOAT32, [0.5, -1e-8, 3e38]), ("t.arr_f64", VT.FLOAT64, [1.5, -2.25]),
]


def write_synthetic(path, alignment, rng):
    """Writes every metadata type and one tensor per type; returns {name: (qtype, raw bytes)}."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, val in SYNTH_META:
        w.add_key_value(key, val, vtype)
    for key, sub, val in SYNTH_ARRAYS:
        w.add_key_value(key, val, VT.ARRAY, sub_type=sub)
    tensors = {}
    data = rng.standard_normal((6, 512)).astype(np.float32)
    data[1, 7] = 40.0  # an outlier, so some blocks have a wide range
    for qtype in sorted(KNOWN, key=int):
        if qtype in K_HALF_FIELDS:  # gguf-py cannot quantize K-quants: random valid blocks
            raw = random_k_blocks(qtype, data.size // 256, rng).reshape(data.shape[0], -1)
        else:
            try:
                raw = gguf.quants.quantize(data, qtype)
            except NotImplementedError:  # Q8_1 and Q8_K: matmul intermediates only
                continue
        name = f"w.{qtype.name}"
        w.add_tensor(name, raw, raw_dtype=qtype)
        tensors[name] = (qtype, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("alignment", [None, 64])
def test_synthetic_file_matches_gguf_py(dump_bin, tmp_path, alignment):
    rng = np.random.default_rng(1234)
    path = tmp_path / "synthetic.gguf"
    tensors = write_synthetic(path, alignment, rng)
    info = run_info(dump_bin, path)
    assert info["version"] == 3
    assert info["alignment"] == (alignment or 32)
    meta = {m["key"]: m for m in info["metadata"]}
    assert meta["general.architecture"]["value"] == "llama"
    for key, vtype, val in SYNTH_META:
        assert meta[key]["type"] == VALUE_TYPE_NAMES[vtype], key
        expect = float(np.float32(val)) if vtype == VT.FLOAT32 else val
        assert meta[key]["value"] == expect, key
    for key, sub, val in SYNTH_ARRAYS:
        assert (meta[key]["type"], meta[key]["elem_type"]) == ("array", VALUE_TYPE_NAMES[sub])
        expect = [float(v) for v in np.float32(val)] if sub == VT.FLOAT32 else val
        assert meta[key]["value"] == expect, key

    reader = gguf.GGUFReader(str(path))
    by_name = {t["name"]: t for t in info["tensors"]}
    assert set(by_name) == {t.name for t in reader.tensors} == set(tensors)
    for rt in reader.tensors:
        ours = by_name[rt.name]
        assert ours["type"] == rt.tensor_type.name
        assert ours["dims"] == [int(d) for d in rt.shape]
        assert info["data_offset"] + ours["offset"] == rt.data_offset
        assert ours["nbytes"] == rt.n_bytes
        qtype, raw = tensors[rt.name]
        if qtype not in DEQUANTIZABLE:
            with pytest.raises(subprocess.CalledProcessError) as err:
                run_dequant(dump_bin, path, rt.name, tmp_path / "x.f32")
            assert b"not supported" in err.value.stderr
            continue
        ref = gguf.quants.dequantize(raw, qtype)
        got = run_dequant(dump_bin, path, rt.name, tmp_path / f"{rt.name}.f32")
        max_abs, max_rel = compare(got, ref, rt.name)
        print(f"[oracle] synthetic align={alignment} {qtype.name:5s} n={got.size} "
              f"max_abs={max_abs:.3g} max_rel={max_rel:.3g}")


def test_types_we_do_not_know_are_rejected(dump_bin, tmp_path):
    """gguf-py can quantize a few types outside our enum (TQ1_0, TQ2_0, MXFP4...): the reader
    must reject such files with a clear error rather than misread them."""
    data = np.random.default_rng(5).standard_normal((2, 256)).astype(np.float32)
    unknown = []
    for qtype in QT:
        if qtype in KNOWN:
            continue
        try:
            raw = gguf.quants.quantize(data, qtype)
        except (NotImplementedError, ValueError):
            continue
        path = tmp_path / f"{qtype.name}.gguf"
        w = gguf.GGUFWriter(str(path), arch="llama")
        w.add_tensor("w", raw, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        res = subprocess.run([dump_bin, "info", str(path)], capture_output=True)
        assert res.returncode != 0
        assert f"unknown ggml type id {int(qtype)}".encode() in res.stderr
        unknown.append(qtype.name)
    print(f"[oracle] rejected quantizable types outside our enum: {unknown}")


def field_value(field):
    """A GGUFReader field as the JSON value gguf_dump prints (None for nested/bool arrays)."""
    main = field.types[0]
    if main != VT.ARRAY:
        v = field.contents()
        return float(v) if main in (VT.FLOAT32, VT.FLOAT64) else v
    if len(field.types) > 2 or field.types[-1] == VT.BOOL:
        return None
    values = field.contents()
    if field.types[-1] in (VT.FLOAT32, VT.FLOAT64):
        return [float(v) for v in values]
    return [v if isinstance(v, str) else int(v) for v in values]


def test_real_model_matches_gguf_py(dump_bin, tmp_path):
    if not MODEL.exists():
        pytest.skip(f"{MODEL} not present")
    info = run_info(dump_bin, MODEL)
    reader = gguf.GGUFReader(str(MODEL))
    fields = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    assert [m["key"] for m in info["metadata"]] == [f.name for f in fields]
    for m, f in zip(info["metadata"], fields):
        assert m["type"] == VALUE_TYPE_NAMES[f.types[0]], f.name
        if f.types[0] == VT.ARRAY:
            assert m["elem_type"] == VALUE_TYPE_NAMES[f.types[-1]], f.name
        assert m["value"] == field_value(f), f.name
    print(f"[oracle] model: {len(fields)} metadata keys identical")

    assert len(info["tensors"]) == len(reader.tensors) == 272
    for ours, rt in zip(info["tensors"], reader.tensors):
        assert (ours["name"], ours["type"]) == (rt.name, rt.tensor_type.name)
        assert ours["dims"] == [int(d) for d in rt.shape]
        assert info["data_offset"] + ours["offset"] == rt.data_offset
        assert ours["nbytes"] == rt.n_bytes

    # A sample of each type: first, middle and last tensor; the large Q8_0 embedding by row
    # ranges at both ends.
    by_type = {}
    for rt in reader.tensors:
        by_type.setdefault(rt.tensor_type, []).append(rt)
    for qtype, group in sorted(by_type.items(), key=lambda kv: int(kv[0])):
        sample = {id(t): t for t in (group[0], group[len(group) // 2], group[-1])}.values()
        for rt in sample:
            rows = int(np.prod(rt.shape[1:]))
            ranges = [(0, rows)] if rows <= 4096 else [(0, 1024), (rows - 1024, rows)]
            for r0, r1 in ranges:
                raw = rt.data.reshape(rows, -1)[r0:r1]
                ref = gguf.quants.dequantize(raw, qtype)
                got = run_dequant(dump_bin, MODEL, rt.name, tmp_path / "t.f32", (r0, r1))
                max_abs, max_rel = compare(got, ref, f"{rt.name} rows {r0}:{r1}")
                print(f"[oracle] model {qtype.name:5s} {rt.name} rows {r0}:{r1} n={got.size} "
                      f"max_abs={max_abs:.3g} max_rel={max_rel:.3g}")
