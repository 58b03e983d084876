# SPDX-License-Identifier: Apache-2.0
"""What the compiled machine code of every teacache_fast kernel does, without a GPU.

CUDA (csrc/*.cu): each file is compiled to a cubin for one SM version with the
build's flags (``-std=c++17 -O3``) plus ``-Xptxas -v``; the report reads
ptxas' resource lines, ``cuobjdump --dump-resource-usage``, the kernel
parameter table (``cuobjdump -elf``: EIATTR_KPARAM_INFO) and the SASS
(``cuobjdump -sass``).

Triton (kernels/*.py): every kernel the Triton backend launches for the
benchmark shapes (FLUX (1, 4096, 3072) bf16 and fp32, Wan (1, 32760, 5120)
bf16: LayerNorm with scale and shift, the indicator, the partial sums, the
residual ops; the decision for one state) is compiled ahead of time through
tools/triton_aot_check.py (meta tensors, a pretend GPU of that SM version),
and the report reads the PTX (which keeps the parameter names) and cuobjdump's
resource usage of the cubin.

Per kernel: registers, spills and stack, shared memory, resident blocks per SM
at the launch's block size against what the grid assumes, the widths of the
global loads/stores in the hot loops, how many times each input is read per
row, and whether every load of a row is issued before the row's first
barrier. The method is written into the report's header.

    python tools/kernel_report.py                # sm_90 -> benchmarks/results/kernels-sm90.md
    python tools/kernel_report.py --arch 80      # sm_80 -> benchmarks/results/kernels-sm80.md
    python tools/kernel_report.py --out DIR --json facts.json

TRITON_INTERPRET must be unset (the interpreter cannot compile kernels).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
RESULTS = ROOT / "benchmarks" / "results"
FACTS_BEGIN = "<!-- facts:begin (compared by tests/test_kernel_report.py) -->"
FACTS_END = "<!-- facts:end -->"

# ---------------------------------------------------------------------------- the SM

# Per-SM limits (CUDA programming guide, compute capability tables; the
# register rule is cuda_occupancy.h's cudaOccMaxBlocksPerSMRegsLimit).
SM_LIMITS = {
    90: dict(regs=65536, max_blocks=32, max_threads=2048, smem=233472, reserved_smem=1024),
    80: dict(regs=65536, max_blocks=32, max_threads=2048, smem=167936, reserved_smem=1024),
}
REG_GRANULARITY = 256  # registers are allocated per warp in units of 256
SUB_PARTITIONS = 4     # the register file is split over 4 warp schedulers
SMEM_GRANULARITY = 128


def blocks_per_sm(arch: int, regs: int, threads: int, smem: int) -> tuple[int, str]:
    """Resident blocks of ``threads`` threads per SM and the limit that binds."""
    lim = SM_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // REG_GRANULARITY) * REG_GRANULARITY
    by_regs = (lim["regs"] // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS // warps \
        if regs_per_warp else lim["max_blocks"]
    smem_block = -(-(smem + lim["reserved_smem"]) // SMEM_GRANULARITY) * SMEM_GRANULARITY
    limits = {"regs": by_regs, "threads": lim["max_threads"] // (warps * 32),
              "blocks": lim["max_blocks"], "smem": lim["smem"] // smem_block}
    n = min(limits.values())
    return n, "/".join(k for k, v in limits.items() if v == n)


# ---------------------------------------------------------------------------- instructions

@dataclass
class Instr:
    index: int                 # position in the function
    pred: str | None           # guard predicate, e.g. "!P0" / "%p3"
    op: str                    # opcode with modifiers
    args: list
    target: int | None = None  # branch target (instruction index)
    branch: bool = False
    terminal: bool = False     # no fall-through (EXIT, RET, unconditional branch)
    barrier: bool = False
    mem: tuple | None = None   # (kind "ld"/"st", space "global"/"local"/"shared", bits, addr regs)
    writes: list = field(default_factory=list)  # [(dst reg, base atoms, [src regs])]


_PRED = re.compile(r"^(?:UPT|PT|!?U?P\d)$")


def _split_args(text: str) -> list:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


# ----------------------------------------------------------------------- SASS front end

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T\d])\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_SASS_REG = re.compile(r"(?<![A-Za-z0-9_])(UR\d+|R\d+|UP\d|P\d)(\.64)?")
_SASS_CONST = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")
_NO_DST = ("ST", "STG", "STL", "STS", "BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL", "BAR",
           "BSSY", "BSYNC", "WARPSYNC", "NOP", "YIELD", "MEMBAR", "DEPBAR", "ERRBAR", "CCTL",
           "RED", "REDG", "BPT", "KILL", "FENCE", "NANOSLEEP", "CGAERRBAR", "ACQBULK", "UCGABAR_ARV",
           "UCGABAR_WAIT", "SYNCS", "ELECT")


def _bits(segs: list) -> int:
    for s, b in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if s in segs:
            return b
    return 32


def _expand(reg: str, n: int) -> list:
    m = re.fullmatch(r"(U?R)(\d+)", reg)
    if not m:
        return [reg]
    return [f"{m.group(1)}{int(m.group(2)) + k}" for k in range(n)]


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """{mangled function name: instructions} from ``cuobjdump -sass``."""
    funcs: dict[str, list] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _SASS_LINE.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3), _split_args(m.group(4))))
    return {name: _sass_instrs(rows) for name, rows in funcs.items()}


def _sass_instrs(rows) -> list[Instr]:
    by_addr = {addr: i for i, (addr, *_rest) in enumerate(rows)}
    out = []
    for i, (addr, pred, op, args) in enumerate(rows):
        segs = op.split(".")
        base = segs[0]
        ins = Instr(i, pred[1:] if pred else None, op, args)
        if base in ("BRA", "JMP"):
            ins.branch = True
            ins.target = by_addr.get(int(args[-1], 16)) if args and args[-1].startswith("0x") else None
            conditional = pred is not None or len(args) > 1 or "DIV" in segs
            ins.terminal = not conditional
        elif base in ("EXIT", "RET", "BPT", "KILL", "BRX", "JMX"):
            ins.terminal = pred is None
        elif base == "BAR":
            ins.barrier = True
        space = {"LDG": "global", "STG": "global", "LDL": "local", "STL": "local", "LDS": "shared",
                 "STS": "shared", "LD": "generic", "ST": "generic"}.get(base)
        if space:
            kind = "ld" if base.startswith("LD") else "st"
            mem_arg = next((a for a in args if "[" in a), "")
            groups = re.findall(r"\[([^\]]*)\]", mem_arg)
            addr_regs = []
            if groups:
                for r, wide in _SASS_REG.findall(groups[-1]):
                    addr_regs += _expand(r, 2) if wide else [r]
            ins.mem = (kind, space, _bits(segs), addr_regs)
        if base not in _NO_DST and args:
            n = 4 if "128" in segs else 2 if ("64" in segs or "WIDE" in segs) else 1
            dsts = _expand(args[0], n) if not _PRED.match(args[0]) else [args[0]]
            rest = args[1:]
            if rest and _PRED.match(rest[0]):
                dsts.append(rest[0])
                rest = rest[1:]
            dsts = [d for d in dsts if d not in ("RZ", "URZ", "PT", "UPT")]
            if base in ("LDG", "LDL", "LDS", "LD", "ATOMG", "ATOMS", "ATOM", "S2R", "S2UR", "CS2R"):
                ins.writes = [(d, frozenset(), []) for d in dsts]  # data, not addresses
            else:
                atoms = [int(c, 16) for a in rest for c in _SASS_CONST.findall(a)]
                srcs = []
                reg_args = [a for a in rest if "c[" not in a]
                for k, a in enumerate(reg_args):
                    for r, wide in _SASS_REG.findall(a):
                        if r.lstrip("U").startswith("P") and "X" not in segs:
                            continue  # only a carry-in predicate moves address bits
                        last = "WIDE" in segs and k == len(reg_args) - 1 and r.lstrip("U").startswith("R")
                        srcs += _expand(r, 2) if (wide or last) else [r]
                if base in ("LDC", "ULDC") and len(atoms) == 1:
                    ins.writes = [(d, frozenset({atoms[0] + 4 * k}), srcs) for k, d in enumerate(dsts)]
                else:
                    ins.writes = [(d, frozenset(atoms), srcs) for d in dsts]
        out.append(ins)
    return out


# ------------------------------------------------------------------------ PTX front end

_PTX_REG = re.compile(r"%[a-z]+\d+")


def parse_ptx(text: str) -> dict[str, list[Instr]]:
    """{entry name: instructions} of the .entry functions of a PTX module.
    Parameter loads carry the atom ("param", index)."""
    funcs = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)\s*(?:\.[^{]*)?\{(.*?)\n\}", text, re.S):
        name, body = m.group(1), m.group(3)
        rows, labels = [], {}
        for raw in body.splitlines():
            line = raw.split("//")[0].strip()
            if not line or line.startswith(".") or line in ("{", "}"):
                continue
            lm = re.fullmatch(r"(\$?[\w$]+):", line)
            if lm:
                labels[lm.group(1)] = len(rows)
                continue
            im = re.fullmatch(r"(?:@(!?%\w+)\s+)?([a-z][\w.:]*)\s*(.*?);", line)
            if im:
                rows.append((im.group(1), im.group(2), _split_args(im.group(3))))
        funcs[name] = [_ptx_instr(i, pred, op, args, labels, name) for i, (pred, op, args) in enumerate(rows)]
    return funcs


def _ptx_instr(i, pred, op, args, labels, fname) -> Instr:
    segs = op.split(".")
    ins = Instr(i, pred, op, args)
    if segs[0] == "bra":
        ins.branch, ins.target = True, labels.get(args[0])
        ins.terminal = pred is None
    elif segs[0] in ("ret", "exit", "trap"):
        ins.terminal = pred is None
    elif segs[0] in ("bar", "barrier") and "sync" in segs:
        ins.barrier = True
    if segs[0] in ("ld", "st") and len(segs) > 1 and segs[1] in ("global", "local", "shared", "param"):
        vec = next((int(s[1:]) for s in segs if re.fullmatch(r"v\d", s)), 1)
        bits = next((int(s[1:]) for s in reversed(segs) if re.fullmatch(r"[bfsu]\d+", s)), 32)
        mem_arg = args[1] if segs[0] == "ld" else args[0]
        if segs[1] != "param":
            ins.mem = (segs[0], segs[1], vec * bits, _PTX_REG.findall(mem_arg))
    if segs[0] in ("st", "bra", "ret", "exit", "bar", "barrier", "red", "membar", "fence", "trap") \
            or not args:
        return ins
    dsts = _PTX_REG.findall(args[0])
    if segs[0] == "ld" and segs[1] == "param":
        pm = re.search(rf"{re.escape(fname)}_param_(\d+)", args[1])
        ins.writes = [(d, frozenset({("param", int(pm.group(1)))} if pm else ()), []) for d in dsts]
    elif segs[0] in ("ld", "atom"):
        ins.writes = [(d, frozenset(), []) for d in dsts]  # data, not addresses
    else:
        srcs = [r for a in args[1:] for r in _PTX_REG.findall(a)]
        ins.writes = [(d, frozenset(), srcs) for d in dsts]
    return ins


# ------------------------------------------------------------------------------ analysis

@dataclass
class Loop:
    header: int
    body: set
    parent: "Loop | None" = None
    children: list = field(default_factory=list)


class Function:
    """CFG, natural loops and a flow-sensitive taint of register contents by parameter words."""

    def __init__(self, instrs: list[Instr]):
        self.instrs = instrs
        n = len(instrs)
        leaders = {0}
        for ins in instrs:
            if ins.branch and ins.target is not None:
                leaders.add(ins.target)
            if (ins.branch or ins.terminal) and ins.index + 1 < n:
                leaders.add(ins.index + 1)
        starts = sorted(leaders)
        self.blocks = [(s, (starts[k + 1] if k + 1 < len(starts) else n)) for k, s in enumerate(starts)]
        self.block_of = {}
        for b, (s, e) in enumerate(self.blocks):
            for i in range(s, e):
                self.block_of[i] = b
        self.succ = {b: [] for b in range(len(self.blocks))}
        for b, (s, e) in enumerate(self.blocks):
            last = instrs[e - 1]
            if last.branch and last.target is not None:
                self.succ[b].append(self.block_of[last.target])
            if not last.terminal and e < n:
                self.succ[b].append(self.block_of[e])
        self.pred = {b: [] for b in self.succ}
        for b, ss in self.succ.items():
            for s in ss:
                self.pred[s].append(b)
        self._reachable()
        self._dominators()
        self._loops()
        self._taint()

    def _reachable(self):
        seen, order, stack = set(), [], [(0, iter(self.succ[0]))]
        seen.add(0)
        while stack:  # iterative DFS, post-order
            b, it = stack[-1]
            nxt = next((s for s in it if s not in seen), None)
            if nxt is None:
                order.append(b)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(self.succ[nxt])))
        self.rpo = order[::-1]
        self.reach = seen

    def _dominators(self):
        rank = {b: k for k, b in enumerate(self.rpo)}
        idom = {0: 0}
        changed = True
        while changed:
            changed = False
            for b in self.rpo[1:]:
                ps = [p for p in self.pred[b] if p in idom]
                new = ps[0]
                for p in ps[1:]:
                    a, c = p, new
                    while a != c:
                        while rank[a] > rank[c]:
                            a = idom[a]
                        while rank[c] > rank[a]:
                            c = idom[c]
                    new = a
                if idom.get(b) != new:
                    idom[b], changed = new, True
        self.idom = idom

    def dominates(self, a, b) -> bool:
        while True:
            if a == b:
                return True
            if b == 0:
                return False
            b = self.idom[b]

    def _loops(self):
        bodies: dict[int, set] = {}
        for b in self.reach:
            for h in self.succ[b]:
                if self.dominates(h, b):  # back edge b -> h
                    body = bodies.setdefault(h, {h})
                    stack = [b]
                    while stack:
                        x = stack.pop()
                        if x not in body:
                            body.add(x)
                            stack.extend(p for p in self.pred[x] if p in self.reach)
        loops = [Loop(h, body) for h, body in bodies.items()]
        for lp in loops:
            outer = [o for o in loops if o is not lp and lp.body < o.body]
            lp.parent = min(outer, key=lambda o: len(o.body)) if outer else None
            if lp.parent:
                lp.parent.children.append(lp)
        self.loops = loops
        self.innermost_of = {}
        for b in self.reach:
            inside = [lp for lp in loops if b in lp.body]
            self.innermost_of[b] = min(inside, key=lambda o: len(o.body)) if inside else None

    def _taint(self):
        """Register contents by parameter words, at every memory access. Atoms are constant
        bank offsets (SASS) or ("param", i) (PTX). Per block entry: {reg: atoms} (union over
        predecessors) and the guarded writes every predecessor agrees on."""
        out: dict = {}
        work = list(self.rpo)
        self.addr_atoms, self.addr_direct = {}, {}
        budget = 200 * len(self.rpo) + 1000
        while work and budget:
            budget -= 1
            b = work.pop(0)
            ins_ = [out[p] for p in self.pred[b] if p in out]  # predecessors seen so far
            cur: dict = {}
            for regs, _ in ins_:
                for r, t in regs.items():
                    cur[r] = cur.get(r, frozenset()) | t
            guarded = dict(ins_[0][1]) if ins_ else {}
            for _, g in ins_[1:]:
                guarded = {r: v for r, v in guarded.items() if g.get(r) == v}

            # A write under guard g is what a later read under the same g sees (until g or
            # the register is written again); everyone else sees old | new.
            def get(r, guard):
                g = guarded.get(r)
                return g[1] if g is not None and guard is not None and g[0] == guard \
                    else cur.get(r, frozenset())
            s, e = self.blocks[b]
            for ins in self.instrs[s:e]:
                if ins.mem:
                    self.addr_atoms[ins.index] = [get(r, ins.pred) for r in ins.mem[3]]
                    self.addr_direct[ins.index] = [cur.get(("direct", r), frozenset()) for r in ins.mem[3]]
                new = []
                for dst, atoms, srcs in ins.writes:
                    t, direct = set(atoms), set(atoms)
                    for r in srcs:
                        got = get(r, ins.pred)
                        t |= got
                        if len(got) == 1:  # a register holding one parameter word as is
                            direct |= got
                    new.append((dst, frozenset(t), frozenset(direct)))
                for dst, t, direct in new:
                    key = ("direct", dst)
                    cur[key] = (cur.get(key, frozenset()) | direct) if ins.pred is not None else direct
                    if ins.pred is not None:
                        guarded[dst] = (ins.pred, t)
                        cur[dst] = cur.get(dst, frozenset()) | t
                    else:
                        guarded.pop(dst, None)
                        cur[dst] = t
                    written = dst.lstrip("!%")
                    for r in [r for r, g in guarded.items() if g[0].lstrip("!%") == written]:
                        del guarded[r]
            if out.get(b) != (cur, guarded):
                out[b] = (cur, guarded)
                work.extend(sb for sb in self.succ[b] if sb not in work)


@dataclass
class Access:
    index: int
    kind: str
    space: str
    bits: int
    param: str          # the pointer parameter it goes through, "?" if unknown
    loop: Loop | None   # innermost loop


def accesses(fn: Function, attribute) -> list[Access]:
    out = []
    for ins in fn.instrs:
        if ins.mem and fn.block_of[ins.index] in fn.reach:
            param = attribute(ins, fn.addr_atoms.get(ins.index, []), fn.addr_direct.get(ins.index, []))
            out.append(Access(ins.index, ins.mem[0], ins.mem[1], ins.mem[2], param,
                              fn.innermost_of[fn.block_of[ins.index]]))
    return out


def _ancestors(lp):
    out = []
    while lp is not None:
        out.append(lp)
        lp = lp.parent
    return out


def analyze(fn: Function, acc: list[Access], stage2: frozenset = frozenset()) -> dict:
    """Hot loops, loads per row and the barrier order of one function.

    stage2: parameters read only by a fused finishing step after the rows (the
    partial sums the last block adds); their loads are not row data."""
    glob = [a for a in acc if a.space in ("global", "generic")]
    # Unattributed loads ("?", counted below) take no part in hot loops and passes.
    loads = [a for a in glob if a.kind == "ld" and a.param != "?" and a.param not in stage2]
    maxw = {}
    for a in loads:
        maxw[a.param] = max(maxw.get(a.param, 0), a.bits)
    # A loop is hot for P when it is innermost and reads P at P's widest width.
    hot: dict[int, set] = {}
    for a in loads:
        if a.loop is not None and not a.loop.children and a.bits == maxw[a.param]:
            hot.setdefault(id(a.loop), set()).add(a.param)
    hot_loops = {id(lp): lp for lp in fn.loops if id(lp) in hot}
    # The row: the innermost loop holding every hot loop's parent (the function if none).
    parents = [lp.parent for lp in hot_loops.values()]
    scope = None
    if parents and all(p is not None for p in parents):
        common = set(map(id, _ancestors(parents[0])))
        for p in parents[1:]:
            common &= set(map(id, _ancestors(p)))
        chain = [lp for lp in _ancestors(parents[0]) if id(lp) in common]
        scope = chain[0] if chain else None
    body = scope.body if scope else fn.reach
    kids = scope.children if scope else [lp for lp in fn.loops if lp.parent is None]

    def node(b):
        for k in kids:
            if b in k.body:
                return ("loop", id(k))
        return ("block", b)

    nodes, edges = {}, {}
    for b in body:
        nodes.setdefault(node(b), set()).add(b)
    for b in body:
        for s in fn.succ[b]:
            if s in body and not (scope is not None and s == scope.header):
                u, v = node(b), node(s)
                if u != v:
                    edges.setdefault(u, set()).add(v)
    entry = node(scope.header if scope else 0)
    kid_by_id = {id(k): k for k in kids}

    def sub_loops(k):
        out, stack = [], [k]
        while stack:
            x = stack.pop()
            out.append(x)
            stack.extend(x.children)
        return out

    def weight(nd, param):
        if nd[0] == "loop":
            return int(any(param in hot.get(id(x), ()) for x in sub_loops(kid_by_id[nd[1]])))
        s, e = fn.blocks[nd[1]]
        return int(any(a.index in range(s, e) and a.param == param and a.bits == maxw[param]
                       and a.kind == "ld" for a in loads))

    def longest(param):
        memo, onstack = {}, set()

        def go(nd):
            if nd in memo:
                return memo[nd]
            onstack.add(nd)
            best = 0
            for v in edges.get(nd, ()):
                if v not in onstack:
                    best = max(best, go(v))
            onstack.discard(nd)
            memo[nd] = best + weight(nd, param)
            return memo[nd]
        return go(entry)

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    row_params = sorted({a.param for a in loads if fn.block_of[a.index] in body})
    passes = {p: longest(p) for p in row_params}

    # Barriers vs loads inside one iteration of the row.
    def has(nd, pred):
        return any(pred(fn.instrs[i]) for b in nodes[nd] for i in range(*fn.blocks[b]))
    is_bar = lambda ins: ins.barrier  # noqa: E731
    # The fused finish's loads (stage2) follow the row's last barrier by design.
    finish_loads = {a.index for a in glob if a.kind == "ld" and a.param in stage2}
    is_ld = lambda ins: bool(ins.mem and ins.mem[0] == "ld" and ins.mem[1] in ("global", "generic")  # noqa: E731
                             and ins.index not in finish_loads)
    bar_nodes = [nd for nd in nodes if has(nd, is_bar)]
    after = False
    for nd in bar_nodes:
        if nd[0] == "loop" and has(nd, is_ld):
            after = True
        if nd[0] == "block":
            s, e = fn.blocks[nd[1]]
            first_bar = next(i for i in range(s, e) if fn.instrs[i].barrier)
            if any(is_ld(fn.instrs[i]) for i in range(first_bar, e)):
                after = True
        seen, stack = set(), list(edges.get(nd, ()))
        while stack and not after:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if has(v, is_ld):
                after = True
            stack.extend(edges.get(v, ()))
    hot_widths = sorted({(a.kind, a.bits) for a in glob if a.loop is not None and id(a.loop) in hot_loops})
    per_loop = {}
    for a in loads:
        if a.loop is not None and id(a.loop) in hot_loops:
            per_loop.setdefault(id(a.loop), {}).setdefault(a.param, 0)
            per_loop[id(a.loop)][a.param] += 1
    return {
        "hot_loops": len(hot_loops),
        "row_scope": "loop" if scope else "function",
        "hot_ld_bits": sorted({b for k, b in hot_widths if k == "ld"}),
        "hot_st_bits": sorted({b for k, b in hot_widths if k == "st"}),
        "ld_bits": sorted({a.bits for a in loads}),
        "st_bits": sorted({a.bits for a in glob if a.kind == "st"}),
        "widest_ld": maxw,
        "passes": passes,
        "hot_ld_instrs": {p: n for p in passes if (n := max((d.get(p, 0) for d in per_loop.values()), default=0))},
        "unattributed": sum(a.param == "?" for a in glob),
        "unattributed_bits": sorted({a.bits for a in glob if a.param == "?"}),
        "local_in_loop": any(a.space == "local" and a.loop is not None for a in acc),
        "local_accesses": sum(a.space == "local" for a in acc),
        "barriers": sum(ins.barrier for ins in fn.instrs if fn.block_of[ins.index] in body),
        "loads_before_barrier": (not after) if bar_nodes else None,
    }


# ------------------------------------------------------------------------------ CUDA side

@dataclass
class KernelFacts:
    backend: str
    name: str
    case: str
    threads: int
    assumed: int | None
    regs: int
    stack: int
    spill_st: int
    spill_ld: int
    local: int
    smem: int
    blocks: int
    limiter: str
    sass: dict
    params: list
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        d = dict(self.__dict__)
        d.update(self.sass)
        del d["sass"]
        return d


def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> str:
    s = demangled.replace("(anonymous namespace)::", "").replace("tcf::", "")
    s = re.sub(r"^void\s+", "", s)
    depth, cut = 0, len(s)
    for k, ch in enumerate(s):  # drop the parameter list
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = k
            break
    return s[:cut].replace(", ", ",")


# A kernel's optional __launch_bounds__(...) between "void" and its name.
_BOUNDS = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"


def _source_params() -> dict[str, list[str]]:
    """{kernel: parameter names} from the __global__ signatures in csrc/."""
    out = {}
    for path in sorted(CSRC.glob("*.cu")):
        text = re.sub(r"//[^\n]*", "", path.read_text())
        for m in re.finditer(r"__global__\s+void\s+" + _BOUNDS + r"(\w+)\s*\(", text):
            depth, k = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[k], 0)
                k += 1
            params = [p.strip() for p in _split_args(text[m.end():k - 1]) if p.strip()]
            out[m.group(1)] = [re.findall(r"\w+", p)[-1] for p in params]
    return out


def _header_int(name: str) -> int:
    m = re.search(rf"constexpr\s+int\s+{name}\s*=\s*(\d+)", (CSRC / "common.cuh").read_text())
    if not m:
        raise RuntimeError(f"{name} not found in csrc/common.cuh")
    return int(m.group(1))


# Which launches size their grid for kBlocksPerSm resident blocks (blocks_per_sample).
CUDA_GRID_ASSUMES_RESIDENCY = {"rel_l1_kernel", "capture_kernel", "apply_kernel", "span_end_kernel"}
# Kernels whose grid assumes the resident blocks named by their last template
# argument (also their __launch_bounds__ minimum): the two row kernels.
CUDA_BLOCKS_ARG = {"modulate_rows_kernel", "modulate_regs_kernel"}
# Kernels that hold the row in registers: the row is one iteration of an
# innermost loop (the rows of a chunk), which holds the statistics' barriers.
CUDA_ROW_IN_LOOP = {"modulate_regs_kernel"}
BENCH_WIDTHS = (3072, 5120)
# The reduction kernels whose last block adds the workspace pairs (one launch per
# reduction): those loads of `ws` come after the rows.
CUDA_STAGE2 = {"modulate_rows_kernel": frozenset({"ws"}), "modulate_regs_kernel": frozenset({"ws"}),
               "rel_l1_kernel": frozenset({"ws"})}
# Not a TeaCache kernel: status.cu's empty launch that probes for a usable device.
CUDA_SKIP = {"probe_kernel"}


def _cuda_threads(kernel: str, short: str) -> int:
    """Block size of the launch at the benchmark shapes (same rule as common.cuh)."""
    k_threads = _header_int("kThreads")
    if kernel not in ("modulate_rows_kernel", "modulate_regs_kernel"):
        return k_threads
    dtype = re.search(r"<(\w+),", short).group(1)
    vec = {"F32": 4, "F16": 8, "BF16": 8}[dtype]
    sizes = set()
    for cols in BENCH_WIDTHS:  # row_threads(cols, vec)
        t = -(-(-(-cols // vec)) // 32) * 32
        sizes.add(max(32, min(k_threads, t)))
    if len(sizes) != 1:
        raise RuntimeError(f"{short}: block size differs across benchmark widths {sizes}")
    return sizes.pop()


def _param_table(elf: str, func: str) -> tuple[int, dict[int, tuple[int, int]]]:
    """(param bank base, {ordinal: (offset, size)}) of one function from cuobjdump -elf."""
    m = re.search(rf"^\.nv\.info\.{re.escape(func)}\n(.*?)(?:\n\n|\Z)", elf, re.M | re.S)
    sec = m.group(1) if m else ""
    base = 0x210
    m = re.search(r"EIATTR_PARAM_CBANK\s*\n\s*Format:.*\n\s*Value:\s*0x[0-9a-f]+\s+0x([0-9a-f]+)", sec)
    if m:
        base = int(m.group(1), 16) & 0xFFFF
    table = {}
    for o, off, size in re.findall(r"Ordinal : (0x[0-9a-f]+)\s+Offset\s*: (0x[0-9a-f]+)\s+Size\s*: (0x[0-9a-f]+)", sec):
        table[int(o, 16)] = (int(off, 16), int(size, 16))
    return base, table


def sass_attribute(names: list[str], base: int, table: dict, pointers: set):
    """Attribute a SASS address to the pointer parameter whose high word flows into it."""
    high = {base + off + 4: names[o] if o < len(names) else f"param{o}"
            for o, (off, size) in table.items() if size == 8 and (o >= len(names) or names[o] in pointers)}

    def attribute(ins: Instr, atoms: list, direct: list) -> str:
        if len(atoms) < 2:
            return "?"
        # The pair's high register: the only pointer high word among everything that flowed
        # into it; when several did, the one it was last formed from (an operand c[0x0][..]
        # or a register holding that word as loaded), if that is one of them and unique.
        found = {high[a] for a in atoms[1] if a in high}
        if len(found) > 1 and len(direct) > 1:
            last = {high[a] for a in direct[1] if a in high} & found
            found = last if len(last) == 1 else found
        return found.pop() if len(found) == 1 else "?"
    return attribute


def _cuda_pointer_params(path_text: str, kernel: str, names: list[str]) -> set:
    m = re.search(r"__global__\s+void\s+" + _BOUNDS + rf"{kernel}\s*\((.*?)\)\s*{{", path_text, re.S)
    params = _split_args(re.sub(r"//[^\n]*", "", m.group(1))) if m else []
    return {names[k] for k, p in enumerate(params) if "*" in p}


def cuda_report(arch: int, jobs: int, workdir: Path) -> tuple[list[KernelFacts], dict]:
    nvcc = _nvcc()
    cuobjdump = _aot().cuobjdump_path()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError("nvcc and cuobjdump are needed for the CUDA part")
    sources = sorted(CSRC.glob("*.cu"))
    flags = ["-std=c++17", "-O3", f"-I{CSRC}", "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v"]

    def build(src: Path):
        out = workdir / f"{src.stem}.sm{arch}.cubin"
        proc = subprocess.run([nvcc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc {src.name} failed:\n{proc.stderr[-3000:]}")
        return src, out, proc.stderr

    start = time.time()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        built = list(pool.map(build, sources))
    compile_s = time.time() - start
    names_by_kernel = _source_params()
    k_blocks = _header_int("kBlocksPerSm")
    facts = []
    for src, cubin, ptxas in built:
        text = src.read_text()
        ptxas_info = {}
        for fn, body in re.findall(r"Compiling entry function '(\S+)' for 'sm_\d+'\n(.*?)(?=ptxas info\s+: Compiling|\Z)", ptxas, re.S):
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
            r = re.search(r"Used (\d+) registers", body)
            s = re.search(r"(\d+) bytes smem", body)
            ptxas_info[fn] = dict(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)),
                                  regs=int(r.group(1)), smem=int(s.group(1)) if s else 0)
        usage = _aot().resource_counts(cubin.read_bytes())
        sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True).stdout)
        elf = subprocess.run([cuobjdump, "-elf", str(cubin)], capture_output=True, text=True).stdout
        pretty = _demangle(sorted(sass))
        for func, instrs in sorted(sass.items(), key=lambda kv: _short(pretty[kv[0]])):
            short = _short(pretty[func])
            kernel = short.split("<")[0]
            if kernel in CUDA_SKIP:
                continue
            names = names_by_kernel.get(kernel, [])
            info = ptxas_info[func]
            base, table = _param_table(elf, func)
            fobj = Function(instrs)
            acc = accesses(fobj, sass_attribute(names, base, table,
                                                _cuda_pointer_params(text, kernel, names)))
            threads = _cuda_threads(kernel, short)
            blocks, limiter = blocks_per_sm(arch, info["regs"], threads, info["smem"])
            assumed = k_blocks if kernel in CUDA_GRID_ASSUMES_RESIDENCY else None
            facts_sass = analyze(fobj, acc, CUDA_STAGE2.get(kernel, frozenset()))
            if kernel in CUDA_BLOCKS_ARG:
                assumed = int(re.search(r",(\d+)>$", short).group(1))
            if kernel in CUDA_ROW_IN_LOOP and facts_sass["loads_before_barrier"] is False:
                in_row_loop = row_loop_loads_before_barrier(fobj)  # checked within one row
                if in_row_loop is not None:
                    facts_sass["loads_before_barrier"] = in_row_loop
            facts.append(KernelFacts(
                "cuda", short, src.name, threads, assumed,
                info["regs"], info["stack"], info["spill_st"], info["spill_ld"],
                usage.get(func, {}).get("LOCAL", 0), info["smem"], blocks, limiter, facts_sass, names))
    return facts, {"nvcc_flags": " ".join(f for f in flags if not f.startswith("-I")),
                   "compile_s": compile_s, "files": [s.name for s in sources]}


# ---------------------------------------------------------------------------- Triton side

def _aot():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import triton_aot_check
    finally:
        sys.path.pop(0)
    return triton_aot_check


# The op benchmark's shapes (teacache_fast/bench_ops.py SIZES) and dtypes.
TRITON_CASES = (("flux", (1, 4096, 3072), "bf16"), ("flux", (1, 4096, 3072), "fp32"),
                ("wan14b", (1, 32760, 5120), "bf16"))
# Row kernels also with fp32 modulation params on a bf16 row (a model whose
# timestep embedding stays in fp32).
TRITON_ROW_CASES = TRITON_CASES + (("flux", (1, 4096, 3072), "bf16", "fp32"),)
# The reductions' fused finish (kernels/rel_l1.py finish_in_last_program): the
# last program re-reads the launch's partial pairs after its rows; not row data.
TRITON_STAGE2 = {"_modulated_rel_l1_kernel": frozenset({"part_ptr"}),
                 "_rel_l1_partials_kernel": frozenset({"part_ptr"})}
TRITON_GRID_ASSUMES_RESIDENCY = {"_modulate_kernel", "_modulated_rel_l1_kernel", "_rel_l1_partials_kernel",
                                 "_residual_capture_kernel", "_residual_apply_kernel", "_span_end_kernel"}


def triton_thunks():
    import torch

    aot = _aot()
    from teacache_fast.backends import triton as tb
    meta = aot._meta
    cases = []
    for size, shape, dname, *params in TRITON_ROW_CASES:
        B, N, C = shape
        x, ss = meta(shape, aot.DTYPES[dname]), meta((B, C), aot.DTYPES[params[0] if params else dname])
        label = f"{size} {dname}" + (f" {params[0]} params" if params else "")
        cases.append((f"modulate {label}", lambda x=x, s=ss: tb.modulate(x, s, s, "layer", 1e-6)))
        cases.append((f"modulated_rel_l1_ {label}", lambda x=x, s=ss: tb.modulated_rel_l1_(
            x, s, s, torch.empty_like(x), "layer", 1e-6, False)))
    for size, shape, dname in TRITON_CASES:
        dt = aot.DTYPES[dname]
        B, N, C = shape
        label = f"{size} {dname}"
        flat = meta((1, B * N * C), dt)
        cases.append((f"rel_l1_partials {label}", lambda f=flat: tb.rel_l1_partials(f, torch.empty_like(f), False)))
        cases.append((f"residual_capture_ {label}", lambda f=flat: tb.residual_capture_(
            f.view(-1), torch.empty_like(f.view(-1)), torch.empty_like(f.view(-1)))))
        cases.append((f"residual_apply_ {label}", lambda f=flat: tb.residual_apply_(f, torch.empty_like(f), None)))
        cases.append((f"residual_apply_out {label}", lambda f=flat: tb.residual_apply_(
            f, torch.empty_like(f), None, out=torch.empty_like(f))))
        cases.append((f"finish_span_ {label}", lambda f=flat: tb.finish_span_(
            meta((), torch.bool), f.view(-1), torch.empty_like(f.view(-1)), torch.empty_like(f.view(-1)))))
    # A per-sample batch wider than the fused finish takes: partials, then _sum_partials_kernel.
    many = meta((80, 1 << 20), aot.DTYPES["bf16"])
    cases.append(("rel_l1_partials per-sample 80x1M bf16",
                  lambda: tb.rel_l1_partials(many, torch.empty_like(many), True)))
    parts = meta((1, 2), torch.float32)
    cases.append(("teacache_decide_ S=1", lambda: tb.teacache_decide_(parts, torch.empty_like(parts), [1.0, -2.0, 3.0], 0.1,
                                                     meta((1,), torch.bool), 3)))
    return cases, tb.resident_programs


# The pointer whose element size the Triton backend passes to launch_config.
TRITON_MAIN_POINTER = {"_modulate_kernel": "x_ptr", "_modulated_rel_l1_kernel": "x_ptr",
                       "_rel_l1_partials_kernel": "cur_ptr", "_residual_capture_kernel": "out_ptr",
                       "_residual_apply_kernel": "hidden_ptr", "_span_end_kernel": "out_ptr"}


def _itemsize(comp) -> int:
    """Bytes per element of the kernel's main input, from its compiled signature ("*bf16")."""
    ty = comp.signature.get(TRITON_MAIN_POINTER.get(comp.fn.__name__, ""), "*fp32")
    return {"*fp32": 4, "*fp16": 2, "*bf16": 2}[ty]


def _is_global_ld(ins: Instr) -> bool:
    return bool(ins.mem and ins.mem[0] == "ld" and ins.mem[1] in ("global", "generic"))


def row_loop_loads_before_barrier(fn: Function) -> bool | None:
    """Row kernels that hold the row in registers (Triton's SINGLE=True, CUDA's
    modulate_regs_kernel) loop over their rows in one innermost loop, which is
    both the hot loop and the row: analyze() sees the row at the scope above
    it (the function; CUDA: the chunk loop) with that loop collapsed to one node, so it cannot
    order loads and barriers inside it. Checked here within one iteration of
    that loop: True when no global load is reachable from a barrier without the
    back edge. None when the kernel has no such loop (one with barriers and
    global loads, and no inner loops)."""
    def has(b, pred, start=None):
        s, e = fn.blocks[b]
        return any(pred(fn.instrs[i]) for i in range(start if start is not None else s, e))
    rows = [lp for lp in fn.loops if not lp.children
            and any(has(b, lambda ins: ins.barrier) for b in lp.body) and any(has(b, _is_global_ld) for b in lp.body)]
    if len(rows) != 1:
        return None
    lp = rows[0]
    for b in lp.body:
        bars = [i for i in range(*fn.blocks[b]) if fn.instrs[i].barrier]
        if not bars:
            continue
        if has(b, _is_global_ld, bars[0]):
            return False
        seen, stack = set(), [v for v in fn.succ[b] if v in lp.body and v != lp.header]
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if has(v, _is_global_ld):
                return False
            stack.extend(w for w in fn.succ[v] if w in lp.body and w != lp.header)
    return True


def ptx_attribute(names: list[str], pointers: set):
    def attribute(ins: Instr, atoms: list, direct: list) -> str:
        found = sorted({names[a[1]] for t in atoms for a in t
                        if isinstance(a, tuple) and a[1] < len(names) and names[a[1]] in pointers})
        return found[0] if len(found) == 1 else "?"
    return attribute


# The per-row statistics of the Triton row kernels (kernels/modulate.py
# _tile_stats: `total` for the mean, `sum_sq` for the variance) are tree sums
# whose order follows the layout Triton picks, and Triton picks it from the
# pointers' alignment. Each row-kernel case is compiled a second time with x,
# prev and out not 16-byte aligned (a view one element into its storage); the
# statistics must reduce in the same layout (the per-program partials are exact
# integer sums, rel_l1.exact_lane_sum, so any layout gives their bits).
TRITON_ROW_DATA = ("x_ptr", "prev_ptr", "out_ptr")
TRITON_STATS = re.compile(r"^(total|sum_sq)(_\d+)?$")
_REDUCE = re.compile(r'%(\w+) = "tt\.reduce"\(.*?\}\) : \((tensor<[^,]+, (#\w+)>)\)', re.S)


def _stats_layouts(ttgir: str) -> list[tuple[str, str]]:
    """(statistic, resolved layout) of each statistics reduce, in program order."""
    aliases = dict(re.findall(r"^(#\w+) = (.*)$", ttgir, re.M))
    out = []
    for name, tensor, alias in _REDUCE.findall(ttgir):
        if TRITON_STATS.match(name):
            out.append((TRITON_STATS.match(name).group(1), tensor.replace(alias, aliases.get(alias, alias))))
    return out


def misaligned_stats_layout(aot, comp, ttgir: str) -> str:
    """'same' / 'DIFFERS' for a row kernel with statistics; '-' otherwise."""
    if comp.constexprs.get("NORM", 0) == 0 or not comp.constexprs.get("SINGLE", False):
        return "-"
    aligned = _stats_layouts(ttgir)
    if not aligned:
        raise RuntimeError(f"{comp.fn.__name__}: no statistics reduce found in its TTGIR")
    drop = {i for i, n in enumerate(comp.fn.arg_names) if n in TRITON_ROW_DATA}
    mis = aot.Compile(comp.fn, comp.arch, comp.signature, comp.constexprs,
                      {k: v for k, v in comp.attrs.items() if k[0] not in drop}, comp.options)
    ok, result = aot.compile_one(mis)
    if not ok:
        raise RuntimeError(f"{comp.fn.__name__} (misaligned): {result}")
    return "same" if _stats_layouts(result.asm["ttgir"]) == aligned else "DIFFERS"


def triton_report(arch: int, workdir: Path) -> tuple[list[KernelFacts], dict]:
    aot = _aot()
    cases, resident_programs = triton_thunks()
    unique: dict = {}
    for label, thunk in cases:
        with aot.recording(arch) as launches:
            thunk()
        for launch in launches:
            comp = aot.specialize(launch, arch)
            unique.setdefault(comp.key(), comp).combos.append(label)
    facts = []
    start = time.time()
    cuobjdump = aot.cuobjdump_path()
    for comp in unique.values():
        ok, result = aot.compile_one(comp)
        if not ok:
            raise RuntimeError(f"{comp.fn.__name__}: {result}")
        ptx = result.asm["ptx"]
        name = comp.fn.__name__
        instrs = parse_ptx(ptx)[name]
        # PTX parameters: the non-constexpr arguments in order (Triton appends scratch pointers).
        names = [p for p, ty in comp.signature.items() if ty != "constexpr" and p not in comp.constexprs]
        pointers = {p for p, ty in comp.signature.items() if ty.startswith("*")}
        fobj = Function(instrs)
        acc = accesses(fobj, ptx_attribute(names, pointers))
        sass = analyze(fobj, acc, TRITON_STAGE2.get(name, frozenset()))
        if sass["row_scope"] == "function" and sass["loads_before_barrier"] is False:
            in_row_loop = row_loop_loads_before_barrier(fobj)
            if in_row_loop is not None:
                sass["loads_before_barrier"] = in_row_loop
        usage = next(iter(aot.resource_counts(result.asm["cubin"]).values()), {})
        cub = workdir / f"{name}.cubin"
        cub.write_bytes(result.asm["cubin"])
        sass_text = subprocess.run([cuobjdump, "-sass", str(cub)], capture_output=True, text=True).stdout
        sass_ops = [i.op for f in parse_sass(sass_text).values() for i in f]
        threads = 32 * result.metadata.num_warps
        smem = int(result.metadata.shared)
        blocks, limiter = blocks_per_sm(arch, usage.get("REG", 0), threads, smem)
        consts = " ".join(f"{k}={v}" for k, v in comp.constexprs.items()
                          if k in ("NORM", "HAS_SCALE", "HAS_SHIFT", "HAS_MASK", "IN_PLACE", "BLOCK_C", "BLOCK",
                                   "SINGLE", "TAIL", "FUSED"))
        dtypes = ",".join(sorted({ty[1:] for p, ty in comp.signature.items() if ty.startswith("*") and
                                  p not in ("part_ptr", "mask_ptr", "out_ptr", "ticket_ptr", "compute_ptr")}))
        # Bits each thread loads of every input inside the innermost loops (the
        # row loop when the row is held in registers): x once per element of
        # the row is threads * bits == 8 * itemsize * C.
        row_bits: dict = {}
        for a in acc:
            if a.kind == "ld" and a.space in ("global", "generic") and a.param != "?" \
                    and a.loop is not None and not a.loop.children:
                row_bits[a.param] = row_bits.get(a.param, 0) + a.bits
        sizes = {n: shape[2] for n, shape, *_ in TRITON_ROW_CASES}
        widths = sorted({sizes[c.split()[1]] for c in comp.combos if c.split()[0] in ("modulate", "modulated_rel_l1_")})
        facts.append(KernelFacts(
            "triton", name, f"{' + '.join(dict.fromkeys(comp.combos))}; {dtypes}; {consts}",
            threads, resident_programs(name, result.metadata.num_warps, _itemsize(comp))
            if name in TRITON_GRID_ASSUMES_RESIDENCY else None,
            usage.get("REG", 0), usage.get("STACK", 0), 0, 0, usage.get("LOCAL", 0), smem,
            blocks, limiter, sass, names,
            extra={"dtype": dtypes, "sass_ldg128": sum(op.startswith("LDG") and "128" in op.split(".") for op in sass_ops),
                   "sass_local": sum(op.split(".")[0] in ("LDL", "STL") for op in sass_ops),
                   "row_ld_bits": row_bits, "itemsize": _itemsize(comp), "widths": widths,
                   "single_tile": bool(comp.constexprs.get("SINGLE", False)),
                   "misaligned_stats": misaligned_stats_layout(aot, comp, result.asm["ttgir"]),
                   "lanes": comp.constexprs.get("BLOCK_C", 0) + comp.constexprs.get("TAIL", 0)}))
    return facts, {"compile_s": time.time() - start, "compiles": len(unique)}


# ---------------------------------------------------------------------------------- output

def _fmt_map(d: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(d.items())) or "-"


def facts_table(facts: list[KernelFacts]) -> str:
    head = ("| backend | kernel | case | threads | regs | stack B | spill st/ld B | local B | smem B | "
            "blocks/SM (limit) | grid assumes | hot-loop ld bits | hot-loop st bits | loads per row "
            "(passes) | ld instrs per hot loop | unattributed accesses (bits) | all loads before 1st barrier | "
            "local mem in a loop | stats layout, misaligned rows |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for f in facts:
        s = f.sass
        bar = {None: "no barrier", True: "yes", False: "no"}[s["loads_before_barrier"]]
        assumed = "-" if f.assumed is None else (f"{f.assumed}" + ("" if f.blocks >= f.assumed else " **SHORT**"))
        lines.append(
            f"| {f.backend} | `{f.name}` | {f.case} | {f.threads} | {f.regs} | {f.stack} | "
            f"{f.spill_st}/{f.spill_ld} | {f.local} | {f.smem} | {f.blocks} ({f.limiter}) | {assumed} | "
            f"{','.join(map(str, s['hot_ld_bits'])) or '-'} | {','.join(map(str, s['hot_st_bits'])) or '-'} | "
            f"{_fmt_map(s['passes'])} | {_fmt_map(s['hot_ld_instrs'])} | "
            f"{s['unattributed']}" + (f" ({','.join(map(str, s['unattributed_bits']))})" if s['unattributed'] else "")
            + f" | {bar} | "
            f"{'**yes**' if s['local_in_loop'] else 'no'} | {f.extra.get('misaligned_stats', '-')} |")
    return "\n".join(lines)


# The last comparison of the per-file cubins' SASS with the built extension's (sm_90), by hand:
# (functions identical of functions, date).
SO_SASS_MATCH = ("259 of 259", "2026-12-02")

METHOD = """\
How each column is derived (all from compiled code; nothing is run):

- **CUDA code**: each csrc/*.cu compiled alone to a cubin with the flags above; its SASS was
  identical, function by function ({same_so}), to that of the extension built by `.ci/build_cuda.sh`
  (`setup.py build_ext`) for the same SM (last compared on {same_so_date}).
  `modulate_regs_kernel<T,P,INDICATOR,PACKS,NORM,SCALE,SHIFT,BLOCKS>` holds the row in registers (up
  to PACKS packs of 16 bytes per thread; every shape of the benchmarks takes it): one load per
  input, the statistics from registers. It is specialized at compile time: NORM (0 none, 1 layer,
  2 rms) is the only norm its code holds, and SCALE / SHIFT say whether it reads scale / shift at
  all (no branch on their pointers); the launcher picks the instance, one per norm and parameter
  set (without scale and shift only P = T exists). `modulate_rows_kernel` is the looped path for
  wider rows; it keeps the norm and the parameters run-time choices (specializing it would
  multiply its 10 instances by 12 for rows no benchmark has), so its code holds all three norms and
  its "loads per row" takes the longest path (LayerNorm: mean, variance, output; RMSNorm reads x
  twice, none once).

- **regs, stack, spills**: CUDA from `ptxas -v` (`Used N registers`, `bytes stack frame`, spill
  stores/loads); Triton from `cuobjdump --dump-resource-usage` of the cubin (REG, STACK). **local B**:
  cuobjdump's LOCAL. **smem B**: static shared memory (ptxas) / Triton's dynamic shared memory; the
  1 KiB the driver reserves per block is added for the block count, not shown.
- **threads**: the block size of the launch at the benchmark shapes (CUDA: `kThreads`, and
  `row_threads(C, vec)` for the row kernels at C = 3072 and 5120; Triton: `32 * num_warps` from
  `launch_config` / `row_config`). **blocks/SM**: resident blocks per SM for that block size, the minimum of the
  register limit (cuda_occupancy.h rule: regs x 32 rounded up to 256 per warp, 65536 registers over 4
  sub-partitions), 2048 threads, 32 blocks and {smem_kib} KiB of shared memory per SM; the binding
  limit in parentheses. **grid assumes**: the resident blocks the grid is sized for (CUDA
  `kBlocksPerSm` for launches sized by `blocks_per_sample`, the row kernels' last template argument
  BLOCKS, which is also their `__launch_bounds__` minimum; Triton `resident_programs(kernel,
  num_warps, itemsize)`, whose grids are 132 x that many programs whatever the GPU, so the
  partition of a reduction never depends on the SM count); `-` where the grid does not depend on
  residency.
  **SHORT** marks a grid that assumes more resident blocks than fit.
- **Loops**: a control-flow graph is built from the SASS (CUDA) or the PTX (Triton: `ld.global`
  per pointer argument, as the brief asks; ptxas unrolls Triton's loops in SASS, PTX keeps one load
  per pass), natural loops come from back edges (dominators). A loop is *hot* for an input when it is
  innermost and loads that input at its widest width in the kernel (the vector body; the scalar
  head/tail loops of misaligned rows load narrower and are not hot). The *row* is the innermost loop
  that contains every hot loop's parent (the whole function for flat kernels). **hot-loop ld/st
  bits**: the widths of the global loads/stores in the hot loops (128 = LDG.E.128 /
  ld.global.v4.b32). **loads per row (passes)**: for each input, the largest number of hot loops
  reading it on one path through one iteration of the row (inner loops collapsed to one node each),
  so for_each's vector loop + scalar tail count once, and the three LayerNorm passes count three.
  **ld instrs per hot loop**: the most load instructions of that input in one hot loop (a pack of 8
  fp32 scale values is two 128-bit loads). A row kernel that holds its row in registers (Triton
  `SINGLE=True`, CUDA `modulate_regs_kernel`) has one innermost loop, over its rows, that is both
  the hot loop and the row: its "all loads before 1st barrier" is checked inside one iteration of
  that loop (back edge excluded).
- **Attribution to inputs**: a flow-sensitive dataflow over the code tracks, per register, which
  kernel parameters flow into it. SASS: parameters live in constant bank 0 at the offsets of
  `EIATTR_KPARAM_INFO` (from `EIATTR_PARAM_CBANK`); an LDG/STG is attributed to the pointer parameter
  whose *high* 32-bit word reaches the high register of its address pair (the low word also carries
  alignment offsets derived from other pointers); where several do (a register reused on paths
  the dataflow cannot tell apart), the one the high register was last formed from (an operand
  `c[0x0][..]`, or a register holding that word as loaded) breaks the tie. PTX: `ld.param` of `<kernel>_param_<i>` names the
  argument. Names come from the `__global__` signatures in csrc/ and the Triton signatures.
  **unattributed accesses**: global loads/stores the dataflow could not tie to exactly one
  pointer (register reuse across paths); they take no part in the hot loops or the passes, and the
  test requires them to be narrower than 128 bits (scalar edges), so no vector access goes uncounted.
- **Fused finish**: `modulate_rows_kernel`, `modulate_regs_kernel` and `rel_l1_kernel` (CUDA) and
  `_modulated_rel_l1_kernel` and `_rel_l1_partials_kernel` with FUSED=True (Triton) end with the
  last block (program) to take an integer ticket adding the launch's partial pairs (one launch
  per reduction, up to 64 outputs); those loads of `ws` / `part_ptr` come after the rows and are
  not row data (not in the passes, widths or hot loops). More outputs (the per-sample case of 80 samples)
  take the finishing kernel (`finish_partials_kernel`, `_sum_partials_kernel`).
- **all loads before 1st barrier**: within one iteration of the row, no global load is reachable from
  a barrier (`BAR.SYNC` in SASS, `bar.sync` in PTX); `no barrier` when the row has none.
- **local mem in a loop**: an LDL/STL (ld.local/st.local) inside any loop.
- **stats layout, misaligned rows** (Triton row kernels with a norm): the per-row statistics are
  tree sums whose order follows the layout Triton chooses, and it chooses it from the pointers'
  16-byte alignment. The case is compiled again with x, prev and out *not* aligned (a view one
  element into its storage): `same` when every statistics reduce (`total`, `sum_sq` in
  `_tile_stats`) has the same resolved layout. `DIFFERS` (a bf16 row with fp32 parameters: the x
  loads then set the layout) is why the Triton backend never launches a row kernel on a misaligned
  row: it copies such a row to aligned memory first (`backends/triton.py` `_aligned`), so every
  row reduces in the aligned layout. The per-program partials need neither: they are exact
  integer sums (`exact_lane_sum`), the same bits in any layout.
- The small kernels without rows (`decide_kernel`, `finish_partials_kernel`, `_sum_partials_kernel`,
  `_decide_kernel`) get the same columns, computed over their grid-stride loop or whole function;
  the test holds only the row and elementwise kernels to "once per row" and "loads before the
  barrier".
"""


def _tool_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V[\d.]+", out)
    where = "triton's bundled" if "triton" in tool else tool
    return f"{where}, {m.group(0) if m else 'unknown version'}"


def render(arch: int, facts: list[KernelFacts], meta: dict) -> str:
    import triton

    nvcc_ver = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-2:]
    lines = [
        f"# Kernel report: sm_{arch}",
        "",
        "Generated by `python tools/kernel_report.py" + ("" if arch == 90 else f" --arch {arch}") + "` "
        "(checked by tests/test_kernel_report.py). Do not edit by hand.",
        "",
        f"- generated: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- nvcc: {' '.join(nvcc_ver)}; flags `{meta['cuda']['nvcc_flags']}` (the build's device flags)",
        f"- triton: {triton.__version__}; cuobjdump: {_tool_version(_aot().cuobjdump_path())}",
        f"- compile time: CUDA {meta['cuda']['compile_s']:.1f} s ({len(meta['cuda']['files'])} files), "
        f"Triton {meta['triton']['compile_s']:.1f} s ({meta['triton']['compiles']} compiles)",
        "",
        METHOD.format(smem_kib=SM_LIMITS[arch]["smem"] // 1024, same_so=SO_SASS_MATCH[0],
                      same_so_date=SO_SASS_MATCH[1]),
        "## Facts",
        "",
        FACTS_BEGIN,
        facts_table(facts),
        FACTS_END,
        "",
    ]
    return "\n".join(lines)


def collect(arch: int, jobs: int = 2) -> tuple[list[KernelFacts], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cuda, cmeta = cuda_report(arch, jobs, Path(tmp))
        tri, tmeta = triton_report(arch, Path(tmp))
    return cuda + tri, {"cuda": cmeta, "triton": tmeta}


def extract_facts(markdown: str) -> str:
    """The facts table of a report (what the test compares)."""
    return markdown.split(FACTS_BEGIN, 1)[1].split(FACTS_END, 1)[0].strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS))
    parser.add_argument("--out", default=str(RESULTS), help="folder of kernels-sm<arch>.md")
    parser.add_argument("--json", help="also write the facts as JSON here")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET (the interpreter cannot compile kernels)")
    warnings.filterwarnings("ignore", category=UserWarning)
    facts, meta = collect(args.arch, args.jobs)
    out = Path(args.out) / f"kernels-sm{args.arch}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(args.arch, facts, meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "meta": meta,
                                               "kernels": [f.row() for f in facts]}, indent=1, default=str))
    print(f"wrote {out}: {len(facts)} kernels (CUDA compile {meta['cuda']['compile_s']:.1f} s, "
          f"Triton {meta['triton']['compile_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
