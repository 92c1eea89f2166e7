"""Attacks on the checkpoint reader, each built by hand, opcode by opcode, in torch's zip layout.

Four classes: a file that acts on a real object (BUILD on a global, calls of anything outside the table),
formats other than the zip archive (legacy pickles, tar files with links and FIFOs), archives whose
records lie (compressed, mis-sized, misnamed, doubled), and module graphs that share or contain
themselves. After every attack, torch's functions are what they were, and torch's own loader and the
package's reader still read a good file correctly.
"""
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import io, struct, tarfile, threading, time, zipfile
from collections import OrderedDict
from pathlib import Path
import pytest
import torch

from adamerging_nb.archives import ArchiveError, read_torch_archive, stub_state_dict, unpickle
from adamerging_nb.models import read_ta_state_dict


# --- a pickle assembler ------------------------------------------------------------------------------------------

def G(module, name): return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL
def U(s): b = s.encode(); return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE
def I(n): return b"K" + bytes([n]) if n < 256 else b"J" + struct.pack("<i", n)  # BININT1 / BININT
def PUT(i): return b"q" + bytes([i])
def GET(i): return b"h" + bytes([i])
PROTO, STOP, MARK, TUPLE, EMPTY_TUPLE, EMPTY_DICT, SETITEM, SETITEMS = b"\x80\x02", b".", b"(", b"t", b")", b"}", b"s", b"u"
REDUCE, BUILD, NEWOBJ, NONE, FALSE, BINPERSID, POP = b"R", b"b", b"\x81", b"N", b"\x89", b"Q", b"0"


def tensor(key="0", numel=4, size=(4,), stride=(1,), offset=0, storage="FloatStorage"):
    "Pickle code that rebuilds a float tensor from storage `key`, as torch.save writes it."
    pid = MARK + U("storage") + G("torch", storage) + U(key) + U("cpu") + I(numel) + TUPLE + BINPERSID
    return (G("torch._utils", "_rebuild_tensor_v2") + MARK + pid + I(offset) + MARK + b"".join(map(I, size)) + TUPLE
            + MARK + b"".join(map(I, stride)) + TUPLE + FALSE + G("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE)


def module(cls="torch.nn.modules.container.Sequential", params=b"", modules=b""):
    "Pickle code of an nn.Module object: NEWOBJ of its class, then BUILD with _parameters, _buffers, _modules."
    mod, name = cls.rsplit(".", 1)
    state = (EMPTY_DICT + MARK + U("_parameters") + G("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + MARK + params + SETITEMS
             + U("_buffers") + EMPTY_DICT + U("_modules") + G("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + MARK + modules + SETITEMS
             + U("training") + FALSE + SETITEMS)
    return G(mod, name) + EMPTY_TUPLE + NEWOBJ, state + BUILD


def archive(path, pkl: bytes, storages=None, compress=False, name="archive"):
    "A zip laid out like torch.save's: <name>/data.pkl, <name>/byteorder, <name>/data/<key>."
    storages = {"0": torch.arange(4.0)} if storages is None else storages
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", PROTO + pkl + STOP)
        z.writestr(f"{name}/.format_version", b"1"); z.writestr(f"{name}/.storage_alignment", b"64"); z.writestr(f"{name}/byteorder", b"little")
        for k, v in storages.items(): z.writestr(f"{name}/data/{k}", v.numpy().tobytes() if isinstance(v, torch.Tensor) else v)
        z.writestr(f"{name}/version", b"3\n")  # the records torch.save writes, so that torch's own reader reads these files too
    return path


# --- what must not change ----------------------------------------------------------------------------------------

WATCHED = [torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch._utils._rebuild_parameter_with_state,
           torch.load, torch.serialization._load, torch.save, torch.Tensor.__setstate__, torch.Size, OrderedDict.__init__, set, frozenset]


def snapshot():
    out = []
    for f in WATCHED:
        out.append((f, getattr(f, "__defaults__", None), getattr(f, "__kwdefaults__", None), getattr(f, "__code__", None),
                    dict(getattr(f, "__dict__", {}) or {}), getattr(f, "__module__", None), getattr(f, "__qualname__", None)))
    return out


@pytest.fixture
def untouched(tmp_path):
    "Snapshots torch before the test; afterwards torch and the reader still load a known file exactly."
    good = tmp_path / "good.pt"
    ref = {"w": torch.randn(3, 4), "n": torch.arange(5)}
    torch.save(ref, good)
    before = snapshot()
    yield
    assert snapshot() == before, "the file changed a function of torch"
    for loaded in (torch.load(good, weights_only=True), read_torch_archive(good)):
        assert set(loaded) == set(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)


# --- 1. a file cannot act on a real object ------------------------------------------------------------------------

ATTACKS = {
    # BUILD on an allowed function: sets __defaults__ (changed every later tensor load in the old reader)
    "build on a torch function": G("torch._utils", "_rebuild_tensor_v2") + EMPTY_DICT + U("__defaults__") + MARK + I(7) + TUPLE + SETITEM + BUILD,
    "build on a function, slot state": G("torch._utils", "_rebuild_tensor_v2") + NONE + EMPTY_DICT + U("__kwdefaults__") + EMPTY_DICT + SETITEM + b"\x86" + BUILD,
    "build on OrderedDict's class": G("collections", "OrderedDict") + EMPTY_DICT + U("__init__") + NONE + SETITEM + BUILD,
    "build on a stand-in class": G("src.modeling", "ImageEncoder") + EMPTY_DICT + U("__getattr__") + NONE + SETITEM + BUILD,
    "build on a tensor": tensor() + MARK + NONE + TUPLE + BUILD,
    "build on a storage type": G("torch", "FloatStorage") + EMPTY_DICT + U("dtype") + NONE + SETITEM + BUILD,
    "call of a tensor": tensor() + EMPTY_TUPLE + REDUCE,
    "call of getattr": G("builtins", "getattr") + MARK + G("torch", "Size") + U("__new__") + TUPLE + REDUCE,
    "stack global getattr": U("builtins") + U("getattr") + b"\x93" + EMPTY_TUPLE + REDUCE,
    "dotted name into a module": G("torch.nn.modules", "Module.__init__") + EMPTY_TUPLE + REDUCE,
    "os.system": G("os", "system") + MARK + U("touch pwned") + TUPLE + REDUCE,
    "eval": G("builtins", "eval") + MARK + U("1") + TUPLE + REDUCE,
    "newobj of a function": G("torch._utils", "_rebuild_tensor_v2") + EMPTY_TUPLE + NEWOBJ,
    "newobj of OrderedDict with arguments": G("collections", "OrderedDict") + MARK + I(1) + TUPLE + NEWOBJ,
    "INST": b"i" + b"os\nsystem\n" + MARK,
    "OBJ": MARK + G("os", "system") + U("x") + b"o",
    "EXT1 (copyreg registry)": b"\x82\x01",
    "append to a stand-in": G("src.modeling", "ImageEncoder") + EMPTY_TUPLE + REDUCE + I(1) + b"a",
    "setitem into a stand-in": G("src.modeling", "ImageEncoder") + EMPTY_TUPLE + REDUCE + U("k") + I(1) + SETITEM,
    "parameter with hooks": G("torch._utils", "_rebuild_parameter") + MARK + tensor() + FALSE + EMPTY_DICT + U("h") + I(1) + SETITEM
                            + TUPLE + REDUCE,
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_file_cannot_act_on_a_real_object(tmp_path, untouched, name):
    path = archive(tmp_path / "attack.pt", ATTACKS[name])
    with pytest.raises(ArchiveError, match=r"attack.pt: .*Nothing from the file was executed"):
        read_torch_archive(path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_the_assembler_builds_files_the_reader_accepts(tmp_path, untouched):
    "The same opcodes, used as torch.save uses them, read back, by this reader and by torch's: the refusals above are about the attack."
    t = read_torch_archive(archive(tmp_path / "t.pt", tensor()))
    assert torch.equal(t, torch.arange(4.0)) and torch.equal(torch.load(tmp_path / "t.pt", weights_only=True), t)
    new, build = module(params=U("w") + tensor())
    m = read_torch_archive(archive(tmp_path / "m.pt", new + build))
    assert m.stands_for == "torch.nn.modules.container.Sequential" and list(stub_state_dict(m)) == ["w"]
    assert torch.equal(read_torch_archive(archive(tmp_path / "v.pt", tensor(numel=4, size=(2,), stride=(2,), offset=1))), torch.tensor([1.0, 3.0]))


# --- 2. formats other than the zip archive ----------------------------------------------------------------------

def test_legacy_format_is_refused_before_anything_is_read(tmp_path, untouched):
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "plain.pt").write_bytes(PROTO + G("os", "system") + MARK + U("touch pwned") + TUPLE + REDUCE + STOP)
    for f in ("legacy.pt", "plain.pt"):
        with pytest.raises(ArchiveError, match=r"legacy pre-1.6 format, not torch's zip archive. Re-save it"):
            read_torch_archive(tmp_path / f)
    assert not (tmp_path / "pwned").exists()


def _in_thread(fn, seconds=10):
    "Run fn; fail if it has not returned within `seconds` (a reader that opens a FIFO would block for ever)."
    out = {}
    def run():
        try: fn()
        except BaseException as e: out["e"] = e
    th = threading.Thread(target=run, daemon=True); th.start(); th.join(seconds)
    assert not th.is_alive(), "the reader hung"
    return out.get("e")


def test_tar_archives_with_links_and_fifos_are_refused(tmp_path, untouched):
    secret = tmp_path / "secret.txt"; secret.write_text("outside the archive")
    for kind in (tarfile.SYMTYPE, tarfile.FIFOTYPE):
        path = tmp_path / f"tar-{kind.decode() if isinstance(kind, bytes) else kind}.pt"
        with tarfile.open(path, "w") as tf:
            for member in ("sys_info", "pickle", "storages", "tensors"):
                ti = tarfile.TarInfo(member); ti.type = kind
                if kind == tarfile.SYMTYPE: ti.linkname = str(secret)
                tf.addfile(ti)
        e = _in_thread(lambda: read_torch_archive(path))
        assert isinstance(e, ArchiveError) and "a tar file" in str(e) and "Re-save it" in str(e)


# --- 3. archives whose records lie ------------------------------------------------------------------------------

@pytest.mark.parametrize("case, expect", [
    ("compressed", "compressed record"),
    ("short storage", "holds 12 bytes, its id announces 4"),
    ("path in key", "persistent id this reader does not accept"),
    ("missing storage", "missing record"),
    ("two pickles", "2 data.pkl records"),
    ("past the storage", "reads past its storage"),
    ("storage read twice as two types", "read as two different storages"),
    ("big-endian", "big-endian"),
])
def test_archives_whose_records_lie(tmp_path, untouched, case, expect):
    path = tmp_path / "lie.pt"
    if case == "compressed": archive(path, tensor(), compress=True)
    elif case == "short storage": archive(path, tensor(), {"0": torch.arange(3.0)})
    elif case == "path in key": archive(path, tensor(key="../../etc/passwd"))
    elif case == "missing storage": archive(path, tensor(key="7"))
    elif case == "two pickles":
        archive(path, tensor())
        with zipfile.ZipFile(path, "a") as z: z.writestr("other/data.pkl", PROTO + NONE + STOP)
    elif case == "past the storage": archive(path, tensor(size=(4,), stride=(1,), offset=2))
    elif case == "storage read twice as two types": archive(path, MARK + tensor() + tensor(storage="IntStorage") + TUPLE)
    elif case == "big-endian":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", PROTO + NONE + STOP); z.writestr("archive/byteorder", b"big")
    with pytest.raises(ArchiveError, match=expect):
        read_torch_archive(path)


# --- 4. module graphs ---------------------------------------------------------------------------------------------

def shared_chain(depth: int) -> bytes:
    "A module whose two children are one module, whose two children are one module, ... `depth` levels: 2^depth paths."
    new, build = module(params=U("w") + tensor())
    code = new + build + PUT(0) + POP
    for i in range(1, depth + 1):
        new, build = module(modules=U("a") + GET(i - 1) + U("b") + GET(i - 1))
        code += new + build + PUT(i) + (POP if i < depth else b"")
    return code


def test_shared_children_are_visited_once(tmp_path, untouched):
    path = archive(tmp_path / "deep.pt", shared_chain(40))
    assert path.stat().st_size < 10_000  # a few KB
    t0 = time.perf_counter()
    sd = read_ta_state_dict(path)
    assert time.perf_counter() - t0 < 2.0
    assert list(sd) == ["a." * 40 + "w"]  # the first path names the one tensor


def test_a_module_that_contains_itself_is_refused(tmp_path, untouched):
    new, build = module()
    # NEWOBJ, memoize, then BUILD with a state whose _modules holds the memoized object itself
    state = (EMPTY_DICT + MARK + U("_parameters") + EMPTY_DICT + U("_buffers") + EMPTY_DICT + U("_modules") + EMPTY_DICT
             + U("again") + GET(0) + SETITEM + SETITEMS + BUILD)
    path = archive(tmp_path / "cycle.pt", new + PUT(0) + state)
    with pytest.raises(ArchiveError, match="a module that contains itself"):
        read_ta_state_dict(path)


def test_deep_nesting_does_not_recurse(tmp_path, untouched):
    "10,000 nested modules: no RecursionError, the walk keeps its own stack."
    new, build = module(params=U("w") + tensor())
    code = new + build + PUT(0) + POP
    for i in range(1, 10_001):
        new, build = module(modules=U("c") + b"j" + struct.pack("<I", i - 1))  # LONG_BINGET
        code += new + build + b"r" + struct.pack("<I", i) + (POP if i < 10_000 else b"")  # LONG_BINPUT
    sd = stub_state_dict(read_torch_archive(archive(tmp_path / "nested.pt", code)))
    assert list(sd) == ["c." * 10_000 + "w"]
