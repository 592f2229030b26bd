"""The Triton kernels of :mod:`lightning_topkast.triton_kernels`, imported on first use.

Triton decides at decoration whether a kernel is compiled or interpreted (``TRITON_INTERPRET=1``), so this module
is imported only when a kernel first runs: a test suite can switch the interpreter on after importing the library.
"""

import triton
import triton.language as tl


@triton.jit
def _key(bits, MAXPOS: tl.constexpr, TOP: tl.constexpr):
    # |θ|'s bits + 1, and 0 for NaN: larger keys first is the order; the widths fit (fp16's 15 bits in int32)
    wide = bits.to(tl.int64) if MAXPOS > 0x7FFFFFFF else bits.to(tl.int32)
    magnitude = wide & MAXPOS
    return tl.where(magnitude > TOP, 0, magnitude + 1)


@triton.jit
def _histogram(
    bits_ptr, tile_query, tile_start, tile_end, prefix_ptr, hist_ptr,
    SHIFT: tl.constexpr, WIDTH: tl.constexpr, BINS: tl.constexpr,
    TOP: tl.constexpr, MAXPOS: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    q = tl.load(tile_query + t)
    start, end = tl.load(tile_start + t), tl.load(tile_end + t)
    high = tl.load(prefix_ptr + q) >> (SHIFT + WIDTH)
    counts = tl.zeros([BINS], dtype=tl.int32)
    unmatched = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)
    for i in range(ITERS):
        offsets, inside = _block(start, end, i, BLOCK)
        key = _key(tl.load(bits_ptr + offsets, mask=inside, other=0), MAXPOS, TOP)
        match = inside & ((key >> (SHIFT + WIDTH)) == high)
        digit = ((key >> SHIFT) & ((1 << WIDTH) - 1)).to(tl.int32)
        # not tl.histogram's mask (Triton 3.4 and later): the entries that do not match are counted in bin 0, then
        # taken out of it
        counts += tl.histogram(tl.where(match, digit, 0), BINS)
        unmatched += tl.sum((~match).to(tl.int32), 0)
    bins = tl.arange(0, BINS)
    counts -= tl.where(bins == 0, unmatched, 0)
    tl.atomic_add(hist_ptr + q * BINS + bins, counts, mask=counts > 0)


@triton.jit
def _pick_digit(hist_ptr, prefix_ptr, rank_ptr, SHIFT: tl.constexpr, BINS: tl.constexpr):
    q = tl.program_id(0)
    bins = tl.arange(0, BINS)
    counts = tl.load(hist_ptr + q * BINS + bins).to(tl.int64)
    rank = tl.load(rank_ptr + q)
    above = tl.sum(counts, 0) - tl.cumsum(counts, 0)  # entries in higher bins
    chosen = (above < rank) & (above + counts >= rank)
    found = tl.max(chosen.to(tl.int32), 0) > 0  # always, for a rank in 1..size
    digit = tl.max(tl.where(chosen, bins, 0), 0).to(tl.int64)
    prefix = tl.load(prefix_ptr + q)
    tl.store(prefix_ptr + q, tl.where(found, prefix | (digit << SHIFT), prefix))
    tl.store(rank_ptr + q, tl.where(found, rank - tl.sum(tl.where(chosen, above, 0), 0), rank))


@triton.jit
def _count_ties(
    bits_ptr, tile_query, tile_start, tile_end, prefix_ptr, ties_ptr,
    TOP: tl.constexpr, MAXPOS: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    start, end = tl.load(tile_start + t), tl.load(tile_end + t)
    wanted = tl.load(prefix_ptr + tl.load(tile_query + t))
    total = tl.zeros([BLOCK], dtype=tl.int64)
    for i in range(ITERS):
        offsets, inside = _block(start, end, i, BLOCK)
        key = _key(tl.load(bits_ptr + offsets, mask=inside, other=0), MAXPOS, TOP)
        total += (inside & (key == wanted)).to(tl.int64)
    tl.store(ties_ptr + t, tl.sum(total, 0))


@triton.jit
def _pick_tie(
    bits_ptr, ties_ptr, first_tile, last_tile, tile_start, tile_end, shift_ptr, prefix_ptr, rank_ptr, out_ptr,
    due_ptr, HAS_DUE: tl.constexpr,
    TOP: tl.constexpr, MAXPOS: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0)
    wanted = tl.load(prefix_ptr + q)
    rank = tl.load(rank_ptr + q)
    lo = tl.load(first_tile + q)
    hi = tl.load(last_tile + q)
    tile = lo
    before = rank * 0
    seen = rank * 0
    for first in range(lo, hi, BLOCK):  # the tile where the running count of ties reaches the rank, BLOCK at a time
        tiles = first + tl.arange(0, BLOCK)
        counts = tl.load(ties_ptr + tiles, mask=tiles < hi, other=0)
        running = tl.cumsum(counts, 0) + seen
        hit = (tiles < hi) & (running >= rank) & (running - counts < rank)
        found = tl.max(hit.to(tl.int32), 0) > 0
        tile = tl.where(found, tl.max(tl.where(hit, tiles, 0), 0), tile)
        before = tl.where(found, tl.sum(tl.where(hit, running - counts, 0), 0), before)
        seen += tl.sum(counts, 0)
    start = tl.load(tile_start + tile)
    end = tl.load(tile_end + tile)
    rank_in_tile = rank - before
    seen = rank * 0
    index = start * 0 + end  # past the tile: replaced by the entry's index below
    for i in range(ITERS):
        offsets, inside = _block(start, end, i, BLOCK)
        key = _key(tl.load(bits_ptr + offsets, mask=inside, other=0), MAXPOS, TOP)
        tie = (inside & (key == wanted)).to(tl.int64)
        running = tl.cumsum(tie, 0) + seen
        index = tl.minimum(index, tl.min(tl.where((tie > 0) & (running == rank_in_tile), offsets, end), 0))
        seen += tl.sum(tie, 0)
    write = True
    if HAS_DUE:
        write = tl.load(due_ptr + q // 2) != 0
    if write:
        tl.store(out_ptr + 2 * q, wanted - 1)  # the key back to the score: NaN's 0 is -1
        tl.store(out_ptr + 2 * q + 1, index + tl.load(shift_ptr + q))


@triton.jit
def _block(start, end, i, BLOCK: tl.constexpr):
    # the i-th block of a tile's entries, and which of them are in the tile
    offsets = start + i * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < end


@triton.jit
def _coefficient(code, table_ptr, row):
    # the tensor's coefficient on A or on B \ A (outside B it multiplies 0)
    return tl.where((code & 2) != 0, tl.load(table_ptr + row), tl.load(table_ptr + row + 1))


@triton.jit
def _prepare(
    theta_ptr, code_ptr, grad_ptr, kept_ptr, table_ptr, tile_tensor, tile_unit, tile_start, tile_end,
    COEF_STRIDE: tl.constexpr, PENALTY: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    start, end = tl.load(tile_start + t), tl.load(tile_end + t)
    row = tl.load(tile_tensor + t) * COEF_STRIDE
    for i in range(ITERS):
        offsets, inside = _block(start, end, i, BLOCK)
        code = tl.load(code_ptr + offsets, mask=inside, other=0)
        theta = tl.load(theta_ptr + offsets, mask=inside, other=0)
        in_b = (code & 1) != 0
        kept = tl.where(in_b, theta, 0)
        tl.store(kept_ptr + offsets, kept, mask=inside)
        masked = tl.where(in_b, tl.load(grad_ptr + offsets, mask=inside, other=0), 0)
        if PENALTY:
            masked = masked + _coefficient(code, table_ptr, row) * kept
        tl.store(grad_ptr + offsets, masked, mask=inside)


@triton.jit
def _merge(
    theta_ptr, code_ptr, flat_ptr, table_ptr, tile_tensor, tile_unit, tile_start, tile_end,
    COEF_STRIDE: tl.constexpr, DECOUPLED: tl.constexpr, ALPHA: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    start, end = tl.load(tile_start + t), tl.load(tile_end + t)
    row = tl.load(tile_tensor + t) * COEF_STRIDE
    for i in range(ITERS):
        offsets, inside = _block(start, end, i, BLOCK)
        code = tl.load(code_ptr + offsets, mask=inside, other=0)
        moved = tl.load(flat_ptr + offsets, mask=inside, other=0)
        if DECOUPLED:
            moved = moved + _coefficient(code, table_ptr, row) * moved
        theta = tl.where((code & 1) != 0, moved, tl.load(theta_ptr + offsets, mask=inside, other=0))
        tl.store(theta_ptr + offsets, theta, mask=inside)
        if ALPHA:
            tl.store(flat_ptr + offsets, tl.where((code & 2) != 0, theta, 0), mask=inside)


@triton.jit
def _at_or_above(bits, index, score, split, MAXPOS: tl.constexpr, TOP: tl.constexpr):
    scores = _key(bits, MAXPOS, TOP) - 1  # NaN: -1
    return (scores > score) | ((scores == score) & (index < split))


@triton.jit
def _explorers(
    bits_ptr, code_ptr, thresholds, unit_starts, counts_ptr, tile_tensor, tile_unit, tile_start, tile_end,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, TOP: tl.constexpr, MAXPOS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    start, end = tl.load(tile_start + t), tl.load(tile_end + t)
    unit = tl.load(tile_unit + t)
    score = tl.load(thresholds + 4 * unit)
    split = tl.load(thresholds + 4 * unit + 1) + tl.load(unit_starts + unit)
    total = tl.zeros([BLOCK], dtype=tl.int64)
    for i in range(ITERS):
        offsets, inside = _block(start, end, i, BLOCK)
        code = tl.load(code_ptr + offsets, mask=inside, other=0)
        above = _at_or_above(tl.load(bits_ptr + offsets, mask=inside, other=0), offsets, score, split, MAXPOS, TOP)
        total += (inside & above & ((code & 3) == 1)).to(tl.int64)
    tl.atomic_add(counts_ptr + unit, tl.sum(total, 0))


@triton.jit
def _apply(
    theta_ptr, bits_ptr, code_ptr, thresholds, unit_starts, due_ptr, first_ptr, second_ptr, alpha_ptr,
    counts_ptr, tile_tensor, tile_unit, tile_start, tile_end,
    HAS_DUE: tl.constexpr, STATES: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, TOP: tl.constexpr, MAXPOS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    start, end = tl.load(tile_start + t), tl.load(tile_end + t)
    unit = tl.load(tile_unit + t)
    base = tl.load(unit_starts + unit)
    score_a = tl.load(thresholds + 4 * unit)
    split_a = tl.load(thresholds + 4 * unit + 1) + base
    score_b = tl.load(thresholds + 4 * unit + 2)
    split_b = tl.load(thresholds + 4 * unit + 3) + base
    due = True
    if HAS_DUE:
        due = tl.load(due_ptr + unit) != 0
    left = tl.zeros([BLOCK], dtype=tl.int64)
    size = tl.zeros([BLOCK], dtype=tl.int64)
    for i in range(ITERS):
        offsets, inside = _block(start, end, i, BLOCK)
        code = tl.load(code_ptr + offsets, mask=inside, other=0)
        bits = tl.load(bits_ptr + offsets, mask=inside, other=0)
        was_a = (code & 2) != 0
        was_b = (code & 1) != 0
        in_a = tl.where(due, _at_or_above(bits, offsets, score_a, split_a, MAXPOS, TOP), was_a)
        in_b = tl.where(due, _at_or_above(bits, offsets, score_b, split_b, MAXPOS, TOP), was_b)
        counted = inside & was_a & due
        left += (counted & ~in_a).to(tl.int64)
        size += counted.to(tl.int64)
        stay = was_b & in_b
        if STATES >= 1:
            first = tl.load(first_ptr + offsets, mask=inside, other=0)
            tl.store(first_ptr + offsets, tl.where(stay, first, 0), mask=inside)
        if STATES >= 2:
            second = tl.load(second_ptr + offsets, mask=inside, other=0)
            tl.store(second_ptr + offsets, tl.where(stay, second, 0), mask=inside)
        ever = code & 4
        new = tl.where(in_a, 7, tl.where(in_b, ever | 1, ever)).to(tl.uint8)
        tl.store(code_ptr + offsets, new, mask=inside)
        theta = tl.load(theta_ptr + offsets, mask=inside, other=0)
        tl.store(alpha_ptr + offsets, tl.where(in_a, theta, 0), mask=inside)
    tensor = tl.load(tile_tensor + t)  # per tensor: the members that left A, and the size it had
    tl.atomic_add(counts_ptr + 2 * tensor, tl.sum(left, 0))
    tl.atomic_add(counts_ptr + 2 * tensor + 1, tl.sum(size, 0))
