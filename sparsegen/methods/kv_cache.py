"""The KV cache the emitted module owns: contiguous or paged, with per-sequence lengths.

Contiguous: k, v [B, capacity, Hkv, D]. Paged: k, v [num_pages, page_size, Hkv, D] and a
block table [B, max_logical_pages] int32 mapping each sequence's logical page to a physical
one. Pages come from a free list kept on the host (lengths are known on the host, so
allocation never syncs with the GPU), and can be released and reused. A rule that evicts
(RaaS milestone) may instead take its pages once (`take_pages`) and map them itself: on the
host (`map_page`, `unmap_page`), or on the device, in its own kernel, after
`map_pages_on_device()`; the host's copy of the block table then catches up when read.

Selection rules keep their own metadata beside this cache; a decode step hands it to
`append` (`meta`, and the rule's append kernel that folds the new key into it in the same
launch, `kernel`).
"""
from __future__ import annotations

import math

import torch


class CacheFullError(RuntimeError):
    """The cache has no room for the tokens being appended."""


def capturing(t: torch.Tensor) -> bool:
    """Whether t's work is being captured into a CUDA graph now."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class KVCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype=torch.bfloat16, device="cpu", layout: str = "contiguous",
                 page_size: int = 0, num_pages: int | None = None):
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                            ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KV cache {name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"KV cache dtype must be a floating-point torch dtype (bf16, fp16, "
                             f"fp32), got {dtype!r}")
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.layout, self.page_size, self.capacity = layout, page_size, capacity
        self.lengths = [0] * batch  # host mirror of seq_lens
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self._appenders: dict = {}  # new k/v dtype -> TritonKVAppend (see _append_kernel)
        self.pages_on_device = False  # see map_pages_on_device
        if layout == "contiguous":
            self.k = torch.zeros(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
            self.block_table = None
        elif layout == "paged":
            if page_size <= 0:
                raise ValueError("paged cache needs page_size > 0")
            logical = math.ceil(capacity / page_size)
            num_pages = batch * logical if num_pages is None else num_pages
            self.k = torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=dtype,
                                 device=device)
            self.v = torch.zeros_like(self.k)
            # -1 marks a logical page with no physical page (never written, or evicted)
            self.block_table = torch.full((batch, logical), -1, dtype=torch.int32, device=device)
            self._table_host = [[-1] * logical for _ in range(batch)]
            self._stale_rows: set[int] = set()  # rows a rule's kernel may have changed since
            self.free_pages = list(range(num_pages - 1, -1, -1))  # pop() gives page 0 first
        else:
            raise ValueError(f"layout must be contiguous or paged, not {layout!r}")

    @property
    def device(self):
        return self.k.device

    # --- paging ------------------------------------------------------------------------
    def _row(self, b: int) -> list[int]:
        """The host's copy of sequence b's block-table row, read back from the device (a
        sync) where a rule's kernel may have changed it since (map_pages_on_device)."""
        if b in self._stale_rows:
            self._table_host[b] = self.block_table[b].tolist()
            self._stale_rows.discard(b)
        return self._table_host[b]

    def _unmapped_pages(self, b: int, start: int, stop: int) -> list[int]:
        """The logical pages tokens [start, stop) of sequence b touch that hold no physical
        page yet (none for a contiguous cache, or where a rule maps them on the device);
        CacheFullError unless the sequence can hold `stop` tokens. Pages below `start` are
        not asked about: an evicted page stays evicted."""
        if self.block_table is None:
            if stop > self.capacity:
                raise CacheFullError(f"sequence {b} would hold {stop} tokens; the contiguous "
                                     f"cache was made for {self.capacity}")
            return []
        last = math.ceil(stop / self.page_size)
        if last > self.block_table.shape[1]:
            raise CacheFullError(f"sequence {b} would hold {stop} tokens; the block table "
                                 f"was made for {self.capacity}")
        if self.pages_on_device:
            return []
        return [p for p in range(start // self.page_size, last) if self._row(b)[p] < 0]

    def _opened_on_device(self, tokens: int) -> None:
        """Before `tokens` appends to every sequence whose pages are mapped on the device: the
        rows of the sequences that open a page are read back when next asked for."""
        if self.pages_on_device:
            P = self.page_size
            self._stale_rows.update(b for b, n in enumerate(self.lengths)
                                    if (n + P - 1) // P != (n + tokens + P - 1) // P)

    def _ensure_pages(self, b: int, start: int, stop: int) -> None:
        """Give sequence b physical pages for the logical pages tokens [start, stop) touch.
        Pages are handed out on the host, which a CUDA graph being captured cannot do."""
        pages = self._unmapped_pages(b, start, stop)
        if pages and capturing(self.k):
            raise RuntimeError(f"sequence {b}'s next token opens a page, which cannot be taken "
                               f"while a CUDA graph is captured: call cache.reserve(steps) "
                               f"before capturing that many decode steps")
        for p in pages:
            if not self.free_pages:
                raise CacheFullError("no free page left: raise num_pages or evict")
            self.map_page(b, p, self.free_pages.pop())

    def _check_free_pages(self, tokens: list[int], what: str, fix: str) -> None:
        """CacheFullError (before anything is mapped) unless the free pages cover what
        tokens[b] more tokens of every sequence b would open; capacity is checked too."""
        need = sum(len(self._unmapped_pages(b, n, n + t))
                   for b, (n, t) in enumerate(zip(self.lengths, tokens)))
        if need and need > len(self.free_pages):  # paged only (need is 0 when contiguous)
            raise CacheFullError(f"{what} needs {need} new pages and {len(self.free_pages)} "
                                 f"are free: {fix}")

    def reserve(self, tokens: int) -> None:
        """Map now the pages each sequence's next `tokens` appends will write (paged; a
        contiguous cache only checks its capacity). Pages are handed out on the host, which a
        CUDA graph being captured cannot do: reserve the decode steps a graph holds before
        capturing it. All or nothing: CacheFullError, nothing mapped, when the free pages do
        not cover it."""
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"reserve takes a token count >= 0, not {tokens!r}")
        self._check_free_pages([tokens] * self.batch, f"reserving {tokens} tokens a sequence",
                               "raise num_pages, reserve fewer steps or evict")
        for b, n in enumerate(self.lengths):
            self._ensure_pages(b, n, n + tokens)

    def check_capacity(self, tokens: int) -> None:
        """CacheFullError unless every sequence can hold `tokens` more tokens (the capacity
        only; nothing is mapped)."""
        for b, n in enumerate(self.lengths):
            self._unmapped_pages(b, n, n + tokens)

    def replayed(self, steps: int) -> None:
        """After a CUDA graph holding `steps` decode appends was replayed again: advance the
        host's token counts to where the replay took the device. (Capturing advanced them
        and not the device, so the replay right after the capture needs no call.) The pages
        those appends wrote must have been mapped before the replay (`reserve`); otherwise
        the replay wrote through unmapped entries, and this raises, changing nothing."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"replayed takes the graph's step count >= 1, not {steps!r}")
        for b, n in enumerate(self.lengths):
            if self._unmapped_pages(b, n, n + steps):
                raise RuntimeError(f"sequence {b}'s tokens {n}-{n + steps - 1} have unmapped "
                                   f"pages: call cache.reserve({steps}) before each replay")
        self._opened_on_device(steps)
        self.lengths = [n + steps for n in self.lengths]

    def release_page(self, b: int, logical_page: int) -> int:
        """Free sequence b's logical page (its tokens are gone for good); returns the
        physical page, which the next allocation reuses."""
        page = self.unmap_page(b, logical_page)
        self.free_pages.append(page)
        return page

    def unmap_page(self, b: int, logical_page: int) -> int:
        """Drop sequence b's logical page from the block table (its tokens are gone for
        good) and return its physical page, which the caller keeps (a page it took with
        take_pages); release_page frees it instead."""
        page = self._row(b)[logical_page]
        if page < 0:
            raise ValueError(f"logical page {logical_page} of sequence {b} holds no page")
        self._table_host[b][logical_page] = -1
        self.block_table[b, logical_page] = -1
        return page

    def map_page(self, b: int, logical_page: int, page: int) -> None:
        """Map sequence b's logical page to physical `page` (from the free list or a caller's
        take_pages); the appends that follow overwrite what the page held."""
        self._row(b)[logical_page] = page
        self.block_table[b, logical_page] = page

    def take_pages(self, n: int) -> list[int]:
        """Take n free pages for a caller that maps them itself (map_page, or its kernel
        after map_pages_on_device); all or nothing."""
        if self.block_table is None:
            raise ValueError("a contiguous cache has no pages to take")
        if n > len(self.free_pages):
            raise CacheFullError(f"{n} pages wanted and {len(self.free_pages)} are free: "
                                 f"raise num_pages")
        return [self.free_pages.pop() for _ in range(n)]

    def map_pages_on_device(self) -> None:
        """From now on the pages new tokens open are mapped on the device, by a rule's kernel
        run before each append, to pages the rule took (take_pages): the host maps none, so
        any run of decode steps can be captured in a CUDA graph (reserve only checks the
        capacity), and its copy of a row that changed is read back when asked for. Writing
        a prompt (`extend`) is refused from then on."""
        if self.block_table is None:
            raise ValueError("only a paged cache maps pages")
        self.pages_on_device = True

    def physical_page(self, b: int, logical_page: int) -> int:
        return self._row(b)[logical_page]

    def pages_in_use(self) -> int:
        return self.k.shape[0] - len(self.free_pages) if self.block_table is not None else 0

    # --- writes ------------------------------------------------------------------------
    def _slots(self, b: int, start: int, stop: int):
        """Index tensors addressing tokens [start, stop) of sequence b in self.k."""
        pos = torch.arange(start, stop, device=self.device)
        if self.block_table is None:
            return (b, pos)
        pages = self.block_table[b].long()[pos // self.page_size]
        return (pages, pos % self.page_size)

    def prefill_lengths(self, k: torch.Tensor, v: torch.Tensor, lengths=None) -> list[int]:
        """Check a prefill's k, v [B, T, Hkv, D] (sequence b keeps its first lengths[b]
        tokens; all T by default) against this cache before anything is written, so a bad
        prefill leaves the cache as it was; returns the lengths."""
        want = f"[{self.batch}, T, {self.kv_heads}, {self.head_dim}]"
        if (k.dim() != 4 or v.shape != k.shape
                or (k.shape[0], k.shape[2], k.shape[3]) != (self.batch, self.kv_heads,
                                                            self.head_dim)):
            raise ValueError(f"prefill k and v must both be {want} (the layer's batch, KV "
                             f"heads and head dim); got {tuple(k.shape)} and {tuple(v.shape)}")
        n = k.shape[1]
        lengths = [n] * self.batch if lengths is None else [int(x) for x in lengths]
        if len(lengths) != self.batch or any(not 0 <= x <= n for x in lengths):
            raise ValueError(f"prefill lengths {lengths} must be {self.batch} values in "
                             f"[0, {n}]")
        self._check_free_pages(lengths, "the prefill", "raise num_pages or evict")
        return lengths

    def extend(self, b: int, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
        """Append k, v [n, Hkv, D] to sequence b; returns the token range written."""
        if not 0 <= b < self.batch:
            raise ValueError(f"sequence {b} is outside the cache's batch of {self.batch} (a "
                             f"prefill's batch must be the layer's)")
        want = (self.kv_heads, self.head_dim)
        if k.dim() != 3 or tuple(k.shape[1:]) != want or k.shape != v.shape:
            raise ValueError(f"k and v must both be [n, {want[0]}, {want[1]}] per sequence "
                             f"([B, n, {want[0]}, {want[1]}] for a prefill); got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if self.pages_on_device:
            raise ValueError("this cache's pages are mapped on the device by its rule (a "
                             "decoder's prefill handed them over): prefill a fresh cache")
        start = self.lengths[b]
        stop = start + k.shape[0]
        self._ensure_pages(b, start, stop)
        idx = self._slots(b, start, stop)
        self.k[idx] = k.to(self.k.dtype)
        self.v[idx] = v.to(self.v.dtype)
        self.lengths[b] = stop
        self.seq_lens[b] = stop
        return start, stop

    def append(self, k: torch.Tensor, v: torch.Tensor, impl: str = "auto", meta=None,
               kernel=None) -> None:
        """Append one token to every sequence: k, v [B, Hkv, D]; the cache's one append
        entry point. `kernel` (a rule's append kernel with a meta static: the topk rule's
        TritonKVAppend, the entmax rule's TritonSummaryAppend) appends and folds k into
        `meta` in one launch. Otherwise impl "triton" is
        the fused append kernel (sparsegen.codegen.kv_append), "torch" two scatters; "auto"
        = triton on CUDA; then `meta.append(self, k)` (the torch fold) when meta is given."""
        if k.shape != (self.batch, self.kv_heads, self.head_dim) or v.shape != k.shape:
            raise ValueError(f"append expects k and v of shape "
                             f"{(self.batch, self.kv_heads, self.head_dim)}, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(f"impl must be auto, torch or triton, not {impl!r}")
        if kernel is not None and (meta is None or kernel.static.meta == "none"):
            raise ValueError("an append kernel is for a rule's metadata: pass its meta, and a "
                             "kernel built with one (AppendStatic.meta)")
        # pages are allocated on the host only where a sequence crosses into a new page;
        # the write itself is addressed by seq_lens on the device, so a decode step costs
        # no per-sequence launches and no sync
        for b, n in enumerate(self.lengths):
            self._ensure_pages(b, n, n + 1)
        self._opened_on_device(1)
        self.lengths = [n + 1 for n in self.lengths]
        if kernel is not None:
            from ..codegen.triton_kernel import torch_dtype

            new = torch_dtype(kernel.static.new_dtype)  # the cast is a no-op in a decode step
            kernel(k.to(new).contiguous(), v.to(new).contiguous(), self.k, self.v,
                   self.seq_lens, self.block_table, meta)
            return
        if impl == "triton" or (impl == "auto" and self.k.is_cuda):
            self._append_kernel(k.dtype)(k.contiguous(), v.contiguous(), self.k, self.v,
                                         self.seq_lens, self.block_table)
        else:
            pos = self.seq_lens.long()
            rows = torch.arange(self.batch, device=self.device)
            if self.block_table is None:
                idx = (rows, pos)
            else:
                idx = (self.block_table[rows, pos // self.page_size].long(),
                       pos % self.page_size)
            self.k[idx] = k.to(self.k.dtype)
            self.v[idx] = v.to(self.v.dtype)
            self.seq_lens += 1
        if meta is not None:
            meta.append(self, k)

    def _append_kernel(self, new_dtype):
        """The fused append kernel for new k/v of new_dtype: one per static, shared by every
        cache, and looked up once per cache (append runs every decode step of every layer)."""
        kern = self._appenders.get(new_dtype)
        if kern is None:
            from ..codegen.kv_append import AppendStatic, TritonKVAppend
            from ..codegen.triton_kernel import dtype_name

            static = AppendStatic(self.head_dim, self.kv_heads, dtype_name(self.k.dtype),
                                  dtype_name(new_dtype), self.layout, self.page_size)
            kern = self._appenders[new_dtype] = TritonKVAppend.shared(static)
        return kern

    # --- reads -------------------------------------------------------------------------
    def tokens(self, b: int, start: int = 0, stop: int | None = None):
        """K, V [n, Hkv, D] of sequence b (a copy for paged caches)."""
        stop = self.lengths[b] if stop is None else stop
        if self.block_table is None:
            return self.k[b, start:stop], self.v[b, start:stop]
        idx = self._slots(b, start, stop)
        return self.k[idx], self.v[idx]

    def attention_args(self) -> dict:
        """Keyword arguments of the sparse decode kernels and reference for this cache."""
        return {"k": self.k, "v": self.v, "seq_lens": self.seq_lens,
                "block_table": self.block_table}
