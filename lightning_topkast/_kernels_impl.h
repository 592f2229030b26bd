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

/* ---- gathering the entries near a threshold ---------------------------------------------------------------- */

#define BLOCK 64 /* entries per block of the gather: one 64-bit mask of hits */

/* Two windows of scores, [lo0, hi0) and [lo1, hi1): out[0] = entries scoring at least hi0, out[1] = entries in
 * window 0, out[2] and out[3] the same for window 1. The entries of each window, in index order, go to its buffers
 * (score and index), at most `cap` of them. `blocks` is scratch for 2 * ceil(n / BLOCK) counts.
 *
 * Three phases: count per block (vectorised, in parallel), turn the counts into offsets, then copy the entries of
 * the blocks that hold any (in parallel, each block to its own offsets, so the order is the index order). */
void NAME(gather)(int64_t n, const T *restrict theta, int64_t lo0, int64_t hi0, int64_t lo1, int64_t hi1, int64_t cap,
                  int64_t *restrict scores0, int64_t *restrict index0, int64_t *restrict scores1,
                  int64_t *restrict index1, int64_t *restrict blocks, int64_t *restrict out) {
  int64_t nblocks = (n + BLOCK - 1) / BLOCK, above0 = 0, above1 = 0;
  S l0 = (S)lo0, h0 = (S)hi0, l1 = (S)lo1, h1 = (S)hi1;
#pragma omp parallel for if (n >= ONE_THREAD_BELOW) reduction(+ : above0, above1)
  for (int64_t b = 0; b < nblocks; b++) {
    int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n, c0 = 0, c1 = 0, a0 = 0, a1 = 0;
    for (int64_t i = b * BLOCK; i < end; i++) {
      S s = NAME(score)(theta[i]);
      a0 += s >= h0;
      a1 += s >= h1;
      c0 += (s >= l0) & (s < h0);
      c1 += (s >= l1) & (s < h1);
    }
    blocks[2 * b] = c0;
    blocks[2 * b + 1] = c1;
    above0 += a0;
    above1 += a1;
  }
  int64_t total0 = 0, total1 = 0;
  for (int64_t b = 0; b < nblocks; b++) {
    int64_t c0 = blocks[2 * b], c1 = blocks[2 * b + 1];
    blocks[2 * b] = total0;
    blocks[2 * b + 1] = total1;
    total0 += c0;
    total1 += c1;
  }
  out[0] = above0;
  out[1] = total0;
  out[2] = above1;
  out[3] = total1;
#pragma omp parallel for if (n >= ONE_THREAD_BELOW) schedule(dynamic, 256)
  for (int64_t b = 0; b < nblocks; b++) {
    int64_t next0 = blocks[2 * b], next1 = blocks[2 * b + 1];
    int64_t stop0 = b + 1 < nblocks ? blocks[2 * b + 2] : total0, stop1 = b + 1 < nblocks ? blocks[2 * b + 3] : total1;
    if ((next0 == stop0 || next0 >= cap) && (next1 == stop1 || next1 >= cap)) continue;
    int64_t start = b * BLOCK, end = start + BLOCK < n ? start + BLOCK : n;
    uint64_t hits0 = 0, hits1 = 0; /* bit j: entry start + j is in the window; a loop that vectorises */
    for (int64_t j = 0; j < end - start; j++) {
      S s = NAME(score)(theta[start + j]);
      hits0 |= (uint64_t)((s >= l0) & (s < h0)) << j;
      hits1 |= (uint64_t)((s >= l1) & (s < h1)) << j;
    }
    for (; hits0; hits0 &= hits0 - 1, next0++) {
      int64_t i = start + __builtin_ctzll(hits0);
      if (next0 < cap) {
        scores0[next0] = NAME(score)(theta[i]);
        index0[next0] = i;
      }
    }
    for (; hits1; hits1 &= hits1 - 1, next1++) {
      int64_t i = start + __builtin_ctzll(hits1);
      if (next1 < cap) {
        scores1[next1] = NAME(score)(theta[i]);
        index1[next1] = i;
      }
    }
  }
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
