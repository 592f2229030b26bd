/* The passes for one element type T (with U its unsigned bit pattern, S a signed type that holds a score), named
 * by NAME(). Included by _kernels.c once per type.
 *
 * Set membership is one byte per weight: bit 0 the backward set B, bit 1 the forward set A (A ⊆ B), bit 2 "ever in
 * A". Selects are ternaries, which compile to blends: a NaN or inf outside the selected set never leaks into the
 * result, as it would through a multiply by 0.
 *
 * Scores rank |θ| by the bits of its IEEE representation with the sign cleared: for non-negative floats the bit
 * patterns order as the values do, -0 and +0 tie, +inf ranks above every finite value, and NaN is mapped to -1,
 * below everything. A threshold "at least (t, split)" selects s > t, and s == t at indices below `split`: ties go
 * to the lower index, as in a stable descending sort. Since s > t is s >= t + 1 on integers, each of the index
 * ranges [0, split) and [split, n) needs one plain "s >= constant" compare.
 *
 * Each loop lives in a static inline function whose switches (penalty on or off, how many optimizer-state tensors)
 * are compile-time constants at every call, so each loop body is straight-line code that GCC vectorises. The
 * OpenMP regions only split the index range between threads and sum the counts.
 */

static inline S NAME(score)(T x) {
  U bits;
  memcpy(&bits, &x, sizeof bits);
  bits &= ABS_MASK;
  return bits > INF_BITS ? (S)-1 : (S)bits;
}

/* ---- prepare: before the update -------------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) void NAME(prepare_loop)(int64_t lo, int64_t hi, const T *restrict theta,
                                                                     const uint8_t *restrict code, T *restrict param,
                                                                     T *restrict grad, T lam_a, T lam_e,
                                                                     const int penalty) {
  for (int64_t i = lo; i < hi; i++) {
    uint8_t c = code[i];
    T p = (c & B_BIT) ? theta[i] : (T)0;
    T g = (c & B_BIT) ? grad[i] : (T)0;
    if (penalty) {
      T k = (c & A_BIT) ? lam_a : ((c & B_BIT) ? lam_e : (T)0);
      g = g + k * p;
    }
    param[i] = p;
    grad[i] = g;
  }
}

/* param = θ on B, 0 elsewhere; grad = (grad on B, 0 elsewhere) + c·param, c = lam_a on A and lam_e on B \ A. */
void NAME(prepare)(int64_t n, const T *restrict theta, const uint8_t *restrict code, T *restrict param,
                   T *restrict grad, T lam_a, T lam_e, int32_t penalty) {
#pragma omp parallel if (n >= ONE_THREAD_BELOW)
  {
    int64_t lo, hi;
    thread_part(n, &lo, &hi);
    if (penalty)
      NAME(prepare_loop)(lo, hi, theta, code, param, grad, lam_a, lam_e, 1);
    else
      NAME(prepare_loop)(lo, hi, theta, code, param, grad, lam_a, lam_e, 0);
  }
}

/* ---- finish: after the update ---------------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) void NAME(finish_loop)(int64_t lo, int64_t hi, T *restrict theta,
                                                                    const uint8_t *restrict code, T *restrict param,
                                                                    T dec_a, T dec_e, S ta, S tb, int64_t *counts,
                                                                    const int decoupled) {
  int64_t a_in = 0, a_all = 0, b_in = 0, b_all = 0, explorers = 0;
  for (int64_t i = lo; i < hi; i++) {
    uint8_t c = code[i];
    T p = param[i];
    if (decoupled) p = p + ((c & A_BIT) ? dec_a : dec_e) * p;
    T x = (c & B_BIT) ? p : theta[i];
    theta[i] = x;
    param[i] = (c & A_BIT) ? x : (T)0;
    S s = NAME(score)(x);
    int64_t ga = s >= ta, gb = s >= tb, in_a = (c >> 1) & 1, in_b = c & B_BIT;
    a_all += ga;
    a_in += ga & in_a;
    b_all += gb;
    b_in += gb & in_b;
    explorers += ga & in_b & (1 - in_a);
  }
  counts[0] += a_in;
  counts[1] += a_all;
  counts[2] += b_in;
  counts[3] += b_all;
  counts[4] += explorers;
}

/* θ = param on B (less dec·param, the decoupled penalty, when `decoupled`), θ elsewhere; param = θ on A, 0
 * elsewhere. out: members of A at or above A's threshold (ta, sa), all entries at or above it, the same two for B
 * (tb, sb), and the members of B \ A at or above A's threshold. */
void NAME(finish)(int64_t n, T *restrict theta, const uint8_t *restrict code, T *restrict param, T dec_a, T dec_e,
                  int32_t decoupled, int64_t ta, int64_t sa, int64_t tb, int64_t sb, int64_t *out) {
  int64_t cuts[4] = {0, sa < sb ? sa : sb, sa < sb ? sb : sa, n};
  for (int k = 0; k < 5; k++) out[k] = 0;
#pragma omp parallel if (n >= ONE_THREAD_BELOW)
  {
    int64_t counts[5] = {0, 0, 0, 0, 0};
    for (int r = 0; r < 3; r++) {
      int64_t lo, hi;
      thread_part(cuts[r + 1] - cuts[r], &lo, &hi);
      lo += cuts[r];
      hi += cuts[r];
      S a = (S)(ta + (cuts[r] >= sa)), b = (S)(tb + (cuts[r] >= sb));
      if (decoupled)
        NAME(finish_loop)(lo, hi, theta, code, param, dec_a, dec_e, a, b, counts, 1);
      else
        NAME(finish_loop)(lo, hi, theta, code, param, dec_a, dec_e, a, b, counts, 0);
    }
    for (int k = 0; k < 5; k++) {
#pragma omp atomic
      out[k] += counts[k];
    }
  }
}

/* ---- the two passes of every step over several tensors in one call ------------------------------------------------ */

/* prepare over `count` tensors, described by one table of count rows: size, θ, code, param and grad (addresses as
 * integers), and whether the penalty applies; lams[2t] and lams[2t + 1] are tensor t's coefficients on A and on
 * B \ A. One table, not an array per argument: building the arguments is most of a small step's cost. */
void NAME(prepare_many)(int32_t count, const int64_t *restrict table, const T *restrict lams) {
  for (int32_t t = 0; t < count; t++) {
    const int64_t *row = table + 6 * t;
    NAME(prepare)(row[0], (const T *)(intptr_t)row[1], (const uint8_t *)(intptr_t)row[2], (T *)(intptr_t)row[3],
                  (T *)(intptr_t)row[4], lams[2 * t], lams[2 * t + 1], (int32_t)row[5]);
  }
}

/* finish over `count` tensors, one table row each: size, θ, code and param (addresses as integers), whether the
 * decoupled penalty applies, and the thresholds (ta, sa, tb, sb), the splits local to the tensor; decs[2t] and
 * decs[2t + 1] are dec_a and dec_e; the five counts of tensor t go to out[5t ..]. */
void NAME(finish_many)(int32_t count, const int64_t *restrict table, const T *restrict decs, int64_t *restrict out) {
  for (int32_t t = 0; t < count; t++) {
    const int64_t *row = table + 9 * t;
    NAME(finish)(row[0], (T *)(intptr_t)row[1], (const uint8_t *)(intptr_t)row[2], (T *)(intptr_t)row[3], decs[2 * t],
                 decs[2 * t + 1], (int32_t)row[4], row[5], row[6], row[7], row[8], out + 5 * t);
  }
}

/* ---- counting scores at a ladder of thresholds ----------------------------------------------------------------- */

#define RUNGS 16

/* out[r] = number of entries whose score is at least rungs[r], for RUNGS rungs. */
void NAME(count_at_least)(int64_t n, const T *restrict theta, const int64_t *restrict rungs, int64_t *restrict out) {
  S r[RUNGS];
  for (int k = 0; k < RUNGS; k++) {
    r[k] = (S)rungs[k];
    out[k] = 0;
  }
#pragma omp parallel if (n >= ONE_THREAD_BELOW)
  {
    int64_t lo, hi, c[RUNGS] = {0};
    thread_part(n, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
      S s = NAME(score)(theta[i]);
      for (int k = 0; k < RUNGS; k++) c[k] += s >= r[k]; /* a fixed count: unrolled, and vectorised over i */
    }
    for (int k = 0; k < RUNGS; k++) {
#pragma omp atomic
      out[k] += c[k];
    }
  }
}

/* ---- picking the k-th entry from a window of scores -------------------------------------------------------- */

#define BLOCK 64 /* entries per block of a pick's first pass: one 64-bit mask of hits */

/* The unit's scores live in `parts` tensors, in index order (a global pool has several). For two windows of scores
 * [lo, hi) (windows[0..3]) and a rank k each (ks: the k-th entry of the whole order, from the top), out gets four
 * numbers per window: the entries at or above hi, the entries in the window, and, when the k-th entry is in the
 * window and the window holds at most `cap` entries, that entry's score and one past its global index (else -1,
 * -1): the threshold that names it. Returns 0, or -1 if memory ran out.
 *
 * Three passes, the last two only over what they need: count per block (vectorised, in parallel); copy the entries
 * of a window that holds its k-th entry, block by block to offsets from the counts (so in index order); then a
 * quickselect finds the value of the wanted rank, and a scan in index order the tie it falls on. */
int32_t NAME(pick)(int32_t parts, const int64_t *restrict sizes, T *const *thetas, const int64_t *restrict windows,
                   const int64_t *restrict ks, int64_t cap, int64_t *restrict out) {
  S lo[2] = {(S)windows[0], (S)windows[2]}, hi[2] = {(S)windows[1], (S)windows[3]};
  int64_t above[2] = {0, 0}, total[2] = {0, 0};
  int64_t first_block[parts + 1], first_index[parts + 1];
  first_block[0] = first_index[0] = 0;
  for (int32_t p = 0; p < parts; p++) {
    first_block[p + 1] = first_block[p] + (sizes[p] + BLOCK - 1) / BLOCK;
    first_index[p + 1] = first_index[p] + sizes[p];
  }
  int64_t *blocks = malloc((size_t)(2 * first_block[parts] + 1) * sizeof *blocks);
  if (!blocks) return -1;
  for (int32_t p = 0; p < parts; p++) {
    const T *restrict theta = thetas[p];
    int64_t n = sizes[p], nblocks = first_block[p + 1] - first_block[p], *part = blocks + 2 * first_block[p];
    int64_t above0 = 0, above1 = 0;
#pragma omp parallel for if (n >= ONE_THREAD_BELOW) reduction(+ : above0, above1)
    for (int64_t b = 0; b < nblocks; b++) {
      int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n, c0 = 0, c1 = 0, a0 = 0, a1 = 0;
      for (int64_t i = b * BLOCK; i < end; i++) {
        S s = NAME(score)(theta[i]);
        a0 += s >= hi[0];
        a1 += s >= hi[1];
        c0 += (s >= lo[0]) & (s < hi[0]);
        c1 += (s >= lo[1]) & (s < hi[1]);
      }
      part[2 * b] = c0;
      part[2 * b + 1] = c1;
      above0 += a0;
      above1 += a1;
    }
    above[0] += above0;
    above[1] += above1;
  }
  int inside[2];
  for (int w = 0; w < 2; w++) {
    int64_t running = 0;
    for (int64_t b = 0; b < first_block[parts]; b++) { /* counts into offsets */
      int64_t c = blocks[2 * b + w];
      blocks[2 * b + w] = running;
      running += c;
    }
    total[w] = running;
    inside[w] = above[w] < ks[w] && ks[w] <= above[w] + total[w] && total[w] <= cap;
    out[4 * w] = above[w];
    out[4 * w + 1] = total[w];
    out[4 * w + 2] = out[4 * w + 3] = -1;
  }
  int64_t *entries = NULL;
  if ((inside[0] || inside[1]) && !(entries = malloc((size_t)(3 * (total[0] + total[1]) + 1) * sizeof *entries))) {
    free(blocks);
    return -1;
  }
  if (!entries) {
    free(blocks);
    return 0;
  }
  /* scores and indices of each window's entries, then room for a quickselect */
  int64_t *scores[2] = {entries, entries + 2 * total[0]}, *index[2] = {entries + total[0], entries + 2 * total[0] + total[1]};
  int64_t *work = entries + 2 * (total[0] + total[1]);
  for (int32_t p = 0; p < parts; p++) {
    const T *restrict theta = thetas[p];
    int64_t n = sizes[p], b0 = first_block[p], nblocks = first_block[p + 1] - b0, offset = first_index[p];
#pragma omp parallel for if (n >= ONE_THREAD_BELOW) schedule(dynamic, 256)
    for (int64_t b = 0; b < nblocks; b++) {
      int64_t global = b0 + b, stop = global + 1 < first_block[parts] ? 2 * (global + 1) : -1;
      int64_t start = b * BLOCK, end = start + BLOCK < n ? start + BLOCK : n;
      for (int w = 0; w < 2; w++) {
        int64_t next = blocks[2 * global + w], last = stop >= 0 ? blocks[stop + w] : total[w];
        if (!inside[w] || next == last) continue;
        uint64_t hits = 0; /* bit j: entry start + j is in the window; a loop that vectorises */
        for (int64_t j = 0; j < end - start; j++) {
          S s = NAME(score)(theta[start + j]);
          hits |= (uint64_t)((s >= lo[w]) & (s < hi[w])) << j;
        }
        for (; hits; hits &= hits - 1, next++) {
          int64_t i = start + __builtin_ctzll(hits);
          scores[w][next] = NAME(score)(theta[i]);
          index[w][next] = offset + i;
        }
      }
    }
  }
  for (int w = 0; w < 2; w++) {
    if (!inside[w]) continue;
    int64_t m = total[w], wanted = ks[w] - above[w];
    memcpy(work, scores[w], (size_t)m * sizeof *work);
    int64_t value = topkast_kth_largest(work, m, wanted), greater = 0;
    for (int64_t j = 0; j < m; j++) greater += scores[w][j] > value;
    for (int64_t j = 0, ties = 0; j < m; j++) { /* the entries of the window are in index order */
      if (scores[w][j] == value && ++ties == wanted - greater) {
        out[4 * w + 2] = value;
        out[4 * w + 3] = index[w][j] + 1;
        break;
      }
    }
  }
  free(entries);
  free(blocks);
  return 0;
}

/* ---- apply: new sets at a refresh ------------------------------------------------------------------------------ */

static inline __attribute__((always_inline)) void NAME(apply_loop)(int64_t lo, int64_t hi, const T *restrict theta,
                                                                   uint8_t *restrict code, T *restrict param, S ta,
                                                                   S tb, T *restrict s0, T *restrict s1,
                                                                   T *restrict s2, int64_t *counts,
                                                                   const int states) {
  int64_t left = 0, b_changed = 0, size = 0;
  for (int64_t i = lo; i < hi; i++) {
    uint8_t c = code[i];
    T x = theta[i];
    S s = NAME(score)(x);
    uint8_t in_a = s >= ta, in_b = s >= tb, was_a = (c >> 1) & 1, was_b = c & B_BIT, stay = was_b & in_b;
    code[i] = (uint8_t)(in_b | (in_a << 1) | ((((c >> 2) | in_a) & 1) << 2));
    param[i] = in_a ? x : (T)0;
    left += was_a & (1 - in_a);
    b_changed += was_b != in_b;
    size += in_a;
    if (states > 0) s0[i] = stay ? s0[i] : (T)0;
    if (states > 1) s1[i] = stay ? s1[i] : (T)0;
    if (states > 2) s2[i] = stay ? s2[i] : (T)0;
  }
  counts[0] += left;
  counts[1] += b_changed;
  counts[2] += size;
}

/* New sets from the thresholds (ta, sa) for A and (tb, sb) for B; param = θ on the new A; the optimizer-state
 * tensors s0..s2 (the first `states` of them) are zeroed outside old B ∩ new B, so an entry entering B starts
 * fresh. out: members that left A, entries whose membership of B changed, the size of the new A. */
void NAME(apply)(int64_t n, const T *restrict theta, uint8_t *restrict code, T *restrict param, int64_t ta,
                 int64_t sa, int64_t tb, int64_t sb, T *restrict s0, T *restrict s1, T *restrict s2, int32_t states,
                 int64_t *out) {
  int64_t cuts[4] = {0, sa < sb ? sa : sb, sa < sb ? sb : sa, n};
  out[0] = out[1] = out[2] = 0;
#pragma omp parallel if (n >= ONE_THREAD_BELOW)
  {
    int64_t counts[3] = {0, 0, 0};
    for (int r = 0; r < 3; r++) {
      int64_t lo, hi;
      thread_part(cuts[r + 1] - cuts[r], &lo, &hi);
      lo += cuts[r];
      hi += cuts[r];
      S a = (S)(ta + (cuts[r] >= sa)), b = (S)(tb + (cuts[r] >= sb));
      switch (states) {
        case 0: NAME(apply_loop)(lo, hi, theta, code, param, a, b, s0, s1, s2, counts, 0); break;
        case 1: NAME(apply_loop)(lo, hi, theta, code, param, a, b, s0, s1, s2, counts, 1); break;
        case 2: NAME(apply_loop)(lo, hi, theta, code, param, a, b, s0, s1, s2, counts, 2); break;
        default: NAME(apply_loop)(lo, hi, theta, code, param, a, b, s0, s1, s2, counts, 3); break;
      }
    }
    for (int k = 0; k < 3; k++) {
#pragma omp atomic
      out[k] += counts[k];
    }
  }
}

/* ---- keep: optimizer state on B only --------------------------------------------------------------------------- */

/* x = x where every bit of `bits` is set in code, 0 elsewhere. */
void NAME(keep)(int64_t n, T *restrict x, const uint8_t *restrict code, int32_t bits) {
#pragma omp parallel if (n >= ONE_THREAD_BELOW)
  {
    int64_t lo, hi;
    thread_part(n, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) x[i] = ((code[i] & bits) == bits) ? x[i] : (T)0;
  }
}

/* ---- refresh: the common case of a single tensor, start to end -------------------------------------------------- */

/* A refresh of one tensor after `finish` found its sets moved: thresholds (ta, sa, tb, sb, in and out), the ranks k
 * of A and B, the entries now at or above the old thresholds (at), and the score units per entry near each
 * threshold measured at the last refresh (spacing, in and out). A threshold whose count is still k stays; for the
 * other, a window around the score where the count should now be k (selection.search_threshold's first guess) is
 * picked, both in one pass; then apply (out: left A, changed B, size of A). Returns 1 when done, 0 when there is no
 * spacing yet or a window missed: the caller searches (nothing was written). -1: out of memory. */
int32_t NAME(refresh)(int64_t n, const T *restrict theta, uint8_t *restrict code, T *restrict param,
                      int64_t *restrict thresholds, const int64_t *restrict ks, const int64_t *restrict at,
                      double *restrict spacing, int64_t top, int64_t cap, T *restrict s0, T *restrict s1,
                      T *restrict s2, int32_t states, int64_t *restrict out) {
  int64_t windows[4], found[8];
  int need[2];
  for (int b = 0; b < 2; b++) {
    int64_t moved = at[b] - ks[b];
    need[b] = moved != 0;
    windows[2 * b] = windows[2 * b + 1] = top + 1; /* empty: nothing to pick */
    if (!need[b]) continue;
    if (!(spacing[b] > 0)) return 0;
    double distance = moved < 0 ? (double)-moved : (double)moved;
    double margin = 0.3 * distance + 4.0 * sqrt(distance) + 16.0, t = (double)thresholds[2 * b];
    double lo = floor(t + ((double)moved - margin) * spacing[b]), hi = ceil(t + ((double)moved + margin) * spacing[b]);
    /* both ends clamped to the score range before the cast: a guess far outside it is an empty window, as in
     * selection.search_threshold, not a wrapped one (the scores are 32-bit for fp32); the open end's + 1 is added
     * as an integer, as there: fp64 scores pass 2^53, where a double's + 1 is lost */
    double end = (double)(top + 1);
    windows[2 * b] = lo < -1 ? -1 : (lo > end ? top + 1 : (int64_t)lo);
    windows[2 * b + 1] = hi < -2 ? -1 : (hi >= end ? top + 1 : (int64_t)hi + 1);
  }
  T *const thetas[1] = {(T *)theta};
  if (NAME(pick)(1, &n, thetas, windows, ks, cap, found) != 0) return -1;
  for (int b = 0; b < 2; b++)
    if (need[b] && found[4 * b + 3] < 0) return 0;
  for (int b = 0; b < 2; b++) {
    if (!need[b]) continue;
    /* the next guess: as far as this one moved per entry that crossed (a secant through the two refreshes) */
    int64_t moved_by = found[4 * b + 2] - thresholds[2 * b];
    if (moved_by != 0) spacing[b] = (double)moved_by / (double)(at[b] - ks[b]);
    thresholds[2 * b] = found[4 * b + 2];
    thresholds[2 * b + 1] = found[4 * b + 3];
  }
  int64_t sa = thresholds[1] < n ? thresholds[1] : n, sb = thresholds[3] < n ? thresholds[3] : n;
  NAME(apply)(n, theta, code, param, thresholds[0], sa, thresholds[2], sb, s0, s1, s2, states, out);
  return 1;
}
