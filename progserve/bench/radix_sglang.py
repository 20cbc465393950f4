"""SGLang's own radix caches as sides of `progserve bench radix` (`--compare-sglang`).

Two caches: `RadixCache` (Python) and `UnifiedRadixCache` on its Rust tree core. Each is
driven with the sequence SGLang's scheduler runs per request: match the prompt, lock the
matched node, evict the shortfall when the free KV does not cover the new tokens, insert
the full sequence with its KV slots, free the duplicate slots, unlock.

Importing them on a CPU-only machine. SGLang is installed without its dependencies here
(`pip install --no-deps`), and its cache modules import, through the package's model
configs and quantisation layers, modules that need packages absent here (torchvision,
sentencepiece, compressed_tensors, dill). The caches never run that code. So the import
runs under `tolerant_import()`: while it lasts, an `sglang.*` module whose execution
stops on a `ModuleNotFoundError` for a package that is not installed is kept as far as
it got, and the names it never defined resolve to an inert placeholder. Nothing else is
touched: a module that fails for any other reason fails the import, the finder is
removed afterwards, and the bench refuses to run if a module of `sglang.srt.mem_cache`
itself was cut short (it would no longer be SGLang's cache). The modules cut short are
reported with the results. Run it in its own process (the CLI does): the partial modules
stay in `sys.modules`.
"""

from __future__ import annotations

import array
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from progserve.bench.radix_ops import Request, RunResult

CACHE_PACKAGE = "sglang.srt.mem_cache."


class _PlaceholderType(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder


class Placeholder(metaclass=_PlaceholderType):
    """Stands for a name a cut-short module never defined: any use at import time (a
    decorator, a default, an attribute) gives another placeholder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return Placeholder()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder()


class _PartialModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder


def _not_installed(exc: ModuleNotFoundError) -> bool:
    top = (exc.name or "").partition(".")[0]
    return bool(top) and top != "sglang" and importlib.util.find_spec(top) is None


class _TolerantLoader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader, cut_short: dict[str, str]) -> None:
        self.real = real
        self.cut_short = cut_short

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        try:
            self.real.exec_module(module)
        except ModuleNotFoundError as exc:
            if not _not_installed(exc):
                raise
            module.__class__ = _PartialModule
            self.cut_short[module.__name__] = exc.name or "?"


class _TolerantFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.cut_short: dict[str, str] = {}  # module -> the missing package it needed

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if not fullname.startswith("sglang."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _TolerantLoader(spec.loader, self.cut_short)
        return spec


@contextlib.contextmanager
def tolerant_import() -> Iterator[dict[str, str]]:
    """Import SGLang modules inside; yields {module cut short: the package it lacked}."""
    finder = _TolerantFinder()
    sys.meta_path.insert(0, finder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "only CUDA supports ..." from layers we never run
            yield finder.cut_short
    finally:
        sys.meta_path.remove(finder)


@dataclass(slots=True)
class SGLangCaches:
    """SGLang's cache classes, once imported."""

    torch: Any
    base: Any  # sglang.srt.mem_cache.base_prefix_cache
    radix_key: Any
    radix_cache: Any
    unified: Any | None  # UnifiedRadixCache factory; None without the Rust core
    cut_short: dict[str, str] = field(default_factory=dict)
    note: str | None = None


def import_sglang_caches() -> SGLangCaches | str:
    """SGLang's caches, or the reason they cannot run here."""
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed"
    try:
        with tolerant_import() as cut_short:
            import torch
            from sglang.srt.mem_cache import base_prefix_cache as base
            from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        return f"sglang's RadixCache does not import here: {type(exc).__name__}: {exc}"
    caches = SGLangCaches(torch, base, RadixKey, RadixCache, None, dict(cut_short))
    try:
        with tolerant_import() as more:
            from sglang.srt.mem_cache.cache_init_params import CacheInitParams
            from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
            from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
        caches.cut_short.update(more)

        def unified(allocator: object) -> Any:
            return UnifiedRadixCache(CacheInitParams(
                disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                page_size=1, tree_components=(ComponentType.FULL,), tree_core_backend="rust"))

        unified(_NoOpAllocator(torch))  # fails here, not mid-run, without the Rust core
        caches.unified = unified
    except Exception as exc:  # noqa: BLE001 - a build without the Rust tree core
        caches.note = f"UnifiedRadixCache unavailable: {type(exc).__name__}: {exc}"
    own = sorted(name for name in caches.cut_short if name.startswith(CACHE_PACKAGE))
    if own:
        return f"sglang's cache modules need packages missing here: {own}"
    return caches


class _NoOpAllocator:
    """What SGLang's caches call on their KV allocator: the bench tracks no memory (our
    side frees nothing either), so freeing is a call that does nothing."""

    page_size = 1

    def __init__(self, torch: Any) -> None:
        self.device = torch.device("cpu")

    def free(self, indices: object) -> None:
        pass

    def free_segment(self, indices: object, start_pos: int = 0) -> None:
        pass


def int64_array(tokens: Any) -> array.array:
    """Token ids as SGLang's scheduler holds them (`array("q")`, its tokenizer manager's
    conversion for a list); an `array("q")` is used as is."""
    if type(tokens) is array.array and tokens.typecode == "q":
        return tokens
    if type(tokens) is list:
        return array.array("q", tokens)
    import numpy

    out = array.array("q")  # numpy arrays, CPU tensors: one copy of their bytes
    out.frombytes(memoryview(numpy.ascontiguousarray(tokens, dtype=numpy.int64)).cast("B"))
    return out


class SGLangSide:
    """One of SGLang's caches under the bench's sequence. `prepacked`: the keys (its
    `array("q")`) are built before the timed call, so only the tree is timed."""

    def __init__(self, caches: SGLangCaches, *, capacity: int, unified: bool,
                 prepacked: bool) -> None:
        self.torch, self.base, self.radix_key = caches.torch, caches.base, caches.radix_key
        self.allocator = _NoOpAllocator(caches.torch)
        if unified:
            assert caches.unified is not None
            self.cache = caches.unified(self.allocator)
        else:
            self.cache = caches.radix_cache.create_simulated(mock_allocator=self.allocator)
        self.capacity = capacity
        self.prepacked = prepacked
        self.next_slot = 0
        label = "UnifiedRadixCache (Rust core)" if unified else "RadixCache (Python)"
        self.result = RunResult(name=f"SGLang {label}", prepacked=prepacked)

    def prepare(self, request: Request) -> tuple[Any, array.array | None, array.array | None]:
        start = self.next_slot
        self.next_slot += len(request.prompt) + len(request.output)
        slots = self.torch.arange(start, self.next_slot, dtype=self.torch.int64)
        if not self.prepacked:
            return slots, None, None
        prompt = int64_array(request.prompt)
        return slots, prompt, prompt + int64_array(request.output)

    def op(self, request: Request, prepared: Any) -> tuple[int, int]:
        cache, base, radix_key = self.cache, self.base, self.radix_key
        slots, prompt, full = prepared
        if prompt is None:
            prompt = int64_array(request.prompt)
        match = cache.match_prefix(base.MatchPrefixParams(key=radix_key(prompt)))
        lock = cache.lock(match.last_device_node)
        matched = match.device_prefix_len
        shortfall = (len(prompt) - matched + len(request.output)) - (self.capacity - self.size())
        evicted = 0
        if shortfall > 0:
            evicted = cache.evict(base.EvictParams(num_tokens=shortfall)).num_tokens_evicted
        if full is None:
            full = prompt + int64_array(request.output)  # its origin_input_ids + output_ids
        inserted = cache.insert(base.InsertParams(key=radix_key(full), value=slots))
        self.allocator.free(slots[matched : inserted.prefix_len])  # duplicates
        cache.unlock(lock)
        return matched, evicted

    def size(self) -> int:
        return self.cache.evictable_size() + self.cache.protected_size()
