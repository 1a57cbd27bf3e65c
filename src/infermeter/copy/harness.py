"""Run a list of copy cases for one (model, batch, seq_len): allocate, time, verify, collect.

Buffers: host memory is allocated once per host-memory kind (pinning GBs takes seconds); the
device layouts once per (host kind, layout). Device-to-host reads layout A into host buffer
"out"; host-to-device writes host buffer "in" into layout B; "both" runs the two at once, which is
why a sweep with "both" (or with d2h and h2d) holds two copies of the cache on each side.
Before each case's verification run the source gets a new random pattern, so a destination that
still holds the bytes of an earlier run cannot pass for a correct copy. A case's row says which
check ran and how many bytes it compared: "verified": {"check": "bytes", "bytes": N} (movers: the
layout's bytes against the host buffer, verify.verify_layout) or {"check": "pieces", ...} (the
seed way: each tensor against its source), N = bytes_moved; a mismatch, or a check that covered
fewer bytes than were moved, raises CopyMismatch (one error line) and the case gets no row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from infermeter.copy import methods as cm
from infermeter.copy.cases import Case, LayoutPlan, skip_reason
from infermeter.copy.chunks import plan_chunks, split_evenly
from infermeter.copy.host import alloc_host, fill_host_random, seed_host_pieces
from infermeter.copy.timing import Spin, case_metrics, run_once, time_movers, time_seed
from infermeter.copy.verify import CopyMismatch, verify_layout, verify_pieces
from infermeter.engine.dtypes import torch_dtype
from infermeter.measure.link import LinkInfo, current_link_of
from infermeter.measure.mapped_host import mapped_view
from infermeter.measure.nvtx import traced


@dataclass
class Buffers:
    """What one (host kind, layout) needs: device layouts A / B, host words out / in."""

    plan: LayoutPlan
    src: cm.DeviceLayout | None = None  # d2h source
    dst: cm.DeviceLayout | None = None  # h2d destination
    host_out: torch.Tensor | None = None
    host_in: torch.Tensor | None = None
    mapped_out: torch.Tensor | None = None
    mapped_in: torch.Tensor | None = None


@dataclass
class RunOutput:
    cases: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class CopyRunner:
    """Runs cases; `progress(label)` is called after each case (skipped ones too), and
    `before_case(label)` before each case that could run, its buffers ready, before any of its
    copies (under tensor parallelism a barrier: every rank starts the case together)."""

    def __init__(self, device: torch.device, kv_dtype: str, repeats: int, warmup: int,
                 link: LinkInfo, progress: Callable[[str], None] | None = None,
                 before_case: Callable[[str], None] | None = None) -> None:
        self.device, self.dtype = device, torch_dtype(kv_dtype, stored=True)
        self.repeats, self.warmup, self.link = repeats, warmup, link
        self.progress = progress or (lambda label: None)
        self.before_case = before_case or (lambda label: None)
        self.spin = Spin(device) if device.type == "cuda" else None
        self.out = RunOutput()
        self._seed = 0
        self._link_probed = False
        self.mapped_reason = "no device mapping of pinned memory"

    def _next_seed(self) -> int:
        self._seed += 1
        return self._seed

    # ---- buffers ---------------------------------------------------------------------------
    def _host_raw(self, host_kind: str, nbytes: int, need_out: bool, need_in: bool
                  ) -> dict[str, torch.Tensor | None]:
        pinned = host_kind == "pinned"
        raws: dict[str, torch.Tensor | None] = {"out": None, "in": None}
        for key, needed in (("out", need_out and host_kind != "seed"), ("in", need_in)):
            if needed:
                raw, notes = alloc_host(nbytes, 1, pinned)
                self.out.warnings.extend(notes)
                raws[key] = raw
        if raws["in"] is not None:
            fill_host_random(raws["in"], self._next_seed(), self.device)
        return raws

    def _buffers(self, plan: LayoutPlan, raws: dict[str, Any], mapped: dict[str, Any],
                 need_out: bool, need_in: bool) -> Buffers:
        word = cm.WORD_DTYPES[plan.word_bytes()]
        buf = Buffers(plan)
        if need_out:
            buf.src = cm.DeviceLayout(plan, self.device, self.dtype)
            buf.src.fill_random(self._next_seed())
        if need_in:
            buf.dst = cm.DeviceLayout(plan, self.device, self.dtype)
            buf.dst.fill_random(self._next_seed())
        for key in ("out", "in"):
            if raws[key] is not None:
                setattr(buf, f"host_{key}", raws[key].view(word))
            if mapped.get(key) is not None:
                setattr(buf, f"mapped_{key}", mapped[key].view(word))
        return buf

    # ---- movers ----------------------------------------------------------------------------
    def _mover(self, method: str, direction: str, buf: Buffers) -> Any:
        layout = buf.src if direction == "d2h" else buf.dst
        host = buf.host_out if direction == "d2h" else buf.host_in
        plan = buf.plan
        if method == "per-tensor":
            return cm.PerPiece(cm.piece_pairs(layout, host, direction), self.device, 1)
        if method == "streams":
            if plan.n_pieces >= cm.N_STREAMS:
                pairs = cm.piece_pairs(layout, host, direction)
            else:  # the contiguous buffer: cut it into one part per stream
                pairs = cm.chunk_pairs(layout, host, split_evenly(plan, cm.N_STREAMS), direction)
            return cm.PerPiece(pairs, self.device, cm.N_STREAMS)
        if method == "staged":
            return cm.Staged(layout, host, plan_chunks(plan), direction)
        mapped = buf.mapped_out if direction == "d2h" else buf.mapped_in
        whole = plan_chunks(plan, plan.total_bytes, plan.total_bytes)
        return cm.Mapped(layout, mapped, whole, direction)

    # ---- one case --------------------------------------------------------------------------
    @staticmethod
    def _verified(case: Case, check: str, compared: int, moved: int) -> dict[str, Any]:
        """The row's record of the check that ran; every moved byte must have been compared."""
        if compared != moved:
            raise CopyMismatch(f"copy verification failed for {case.label}: the {check} check "
                               f"compared {compared:,} of the {moved:,} bytes moved")
        return {"check": check, "bytes": compared}

    def _record(self, case: Case, buf: Buffers, metrics: dict[str, Any],
                samples: list[float], pinned: bool | None, verified: dict[str, Any]) -> None:
        row = {"layout": case.layout, "block_tokens": case.block_tokens,
               "host_memory": case.host_memory, "direction": case.direction,
               "method": case.method, "pieces": buf.plan.n_pieces, **metrics,
               "host_pinned": pinned, "verified": verified}
        self.out.cases.append(row)
        self.out.samples[case.label] = samples
        for note in metrics.get("notes", []):
            self.out.warnings.append(f"{case.label}: {note}")

    def _skip(self, case: Case, reason: str) -> None:
        self.out.skipped.append({"layout": case.layout, "block_tokens": case.block_tokens,
                                 "host_memory": case.host_memory, "direction": case.direction,
                                 "method": case.method, "reason": reason})

    def _run_seed(self, case: Case, buf: Buffers) -> None:
        cuda = self.device.type == "cuda"
        result: list[list[torch.Tensor]] = [[]]
        if case.direction == "d2h":
            views = buf.src.piece_views()
            fn = (lambda: result.__setitem__(0, [v.cpu() for v in views])) if cuda else \
                (lambda: result.__setitem__(0, [v.clone() for v in views]))
        else:
            sizes = [v.numel() for v in buf.dst.piece_views()]
            pieces = seed_host_pieces(buf.host_in, sizes)
            fn = (lambda: result.__setitem__(0, [p.to(self.device) for p in pieces])) if cuda \
                else (lambda: result.__setitem__(0, [p.clone() for p in pieces]))
        timing = time_seed(fn, self.repeats, self.warmup, self.device)
        # Verify: a fresh source pattern, one more run, compare piece by piece.
        if case.direction == "d2h":
            buf.src.fill_random(self._next_seed())
            sent = views
        else:
            fill_host_random(buf.host_in, self._next_seed(), self.device)
            sent = pieces = seed_host_pieces(buf.host_in, sizes)
        fn()
        compared = verify_pieces(sent, result[0], case.label)
        verified = self._verified(case, "pieces", compared, buf.plan.total_bytes)
        metrics = case_metrics(buf.plan.total_bytes, 1, timing, self.link.peak_gbps)
        self._record(case, buf, metrics, timing.samples_ms, False, verified)

    def _run_movers(self, case: Case, buf: Buffers) -> None:
        directions = ("d2h", "h2d") if case.direction == "both" else (case.direction,)
        movers = [self._mover(case.method, d, buf) for d in directions]
        spin = self.spin if case.host_memory == "pinned" else None
        timing = time_movers(movers, self.repeats, self.warmup, spin)
        if case.host_memory == "pinned" and not self._link_probed:
            self._probe_link(movers)
        if "d2h" in directions:
            buf.src.fill_random(self._next_seed())
        if "h2d" in directions:
            fill_host_random(buf.host_in, self._next_seed(), self.device)
        run_once(movers, spin, timing.hold_ms)
        compared = 0
        if "d2h" in directions:
            compared += verify_layout(buf.src, buf.host_out, f"{case.label} (d2h)")
        if "h2d" in directions:
            compared += verify_layout(buf.dst, buf.host_in, f"{case.label} (h2d)")
        verified = self._verified(case, "bytes", compared,
                                  buf.plan.total_bytes * len(directions))
        metrics = case_metrics(buf.plan.total_bytes, len(directions), timing,
                               self.link.peak_gbps)
        host = buf.host_out if buf.host_out is not None else buf.host_in
        self._record(case, buf, metrics, timing.samples_ms, bool(host.is_pinned()), verified)

    def _probe_link(self, movers: list[Any]) -> None:
        """Read the PCIe link's current generation/width while a copy is on the wire (an idle
        GPU trains its link down, so a reading at rest says nothing)."""
        self._link_probed = True
        if self.device.type != "cuda" or self.link.kind != "pcie":
            return
        start = torch.cuda.Event()
        start.record()
        for mover in movers:
            mover.enqueue(start)
        gen, width = current_link_of(self.link.bus_id)
        torch.cuda.synchronize(self.device)
        if gen:
            self.link.gen_current, self.link.width_current = gen, width

    def run_case(self, case: Case, buf: Buffers) -> None:
        # Before the mapped check: a rank without mapped memory still meets its peers here.
        self.before_case(case.label)
        reason = None
        if case.method == "mapped":
            needed = [buf.mapped_out if d == "d2h" else buf.mapped_in
                      for d in (("d2h", "h2d") if case.direction == "both" else (case.direction,))]
            if any(m is None for m in needed):
                reason = self.mapped_reason
        if reason:
            self._skip(case, reason)
        elif case.host_memory == "seed":
            with traced(f"copy {case.label}"):  # nsys / --trace: the case's copies by name
                self._run_seed(case, buf)
        else:
            with traced(f"copy {case.label}"):
                self._run_movers(case, buf)
        self.progress(case.label)

    def _mapped_views(self, raws: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        views: dict[str, torch.Tensor | None] = {}
        for key, raw in raws.items():
            if raw is None:
                continue
            views[key], why = mapped_view(raw, self.device)
            if views[key] is None:
                self.mapped_reason = f"mapped pinned memory unavailable: {why}"
        return views

    def run(self, cases: list[Case], plans: dict[tuple[str, int | None], LayoutPlan]
            ) -> RunOutput:
        """Run `cases` (host kind outermost, as enumerate_cases orders them)."""
        directions = {case.direction for case in cases}
        need_out = bool(directions & {"d2h", "both"})
        need_in = bool(directions & {"h2d", "both"})
        nbytes = next(iter(plans.values())).total_bytes
        runnable = []
        for case in cases:  # skip what cannot run before allocating anything for it
            plan = plans[(case.layout, case.block_tokens)]
            reason = skip_reason(case, plan.n_pieces, self.device.type)
            if reason:
                self._skip(case, reason)
                self.progress(case.label)
            else:
                runnable.append(case)
        for host_kind in dict.fromkeys(case.host_memory for case in runnable):
            host_cases = [case for case in runnable if case.host_memory == host_kind]
            raws = self._host_raw(host_kind, nbytes, need_out, need_in)
            wants_mapped = any(case.method == "mapped" for case in host_cases)
            mapped = self._mapped_views(raws) if host_kind == "pinned" and wants_mapped else {}
            for key in dict.fromkeys((case.layout, case.block_tokens) for case in host_cases):
                group = [case for case in host_cases if (case.layout, case.block_tokens) == key]
                buf = self._buffers(plans[key], raws, mapped, need_out, need_in)
                for case in group:
                    self.run_case(case, buf)
                del buf
                self._release()
            del raws, mapped
            self._release()
        return self.out

    def _release(self) -> None:
        """Give freed device blocks back, so the next layout's buffers fit without the old."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
