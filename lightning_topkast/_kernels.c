/* Fused per-step passes of Top-KAST over one masked tensor, for fp32 and fp64 on CPU.
 *
 * kernels.py compiles this file on first use (cc -O3 -march=native -fopenmp, against torch's own OpenMP runtime)
 * and calls it through ctypes with data pointers. Each exported function is one pass over memory; kernels.py
 * holds the same passes written with torch operations, and the tests hold the two to each other bit for bit.
 * _kernels_impl.h has the passes, written once for an element type T; this file instantiates them twice.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define B_BIT 1
#define A_BIT 2
#define EVER_BIT 4
#define ONE_THREAD_BELOW 65536 /* a parallel region costs more than a pass over fewer entries */

/* The k-th largest of x[0..n) (1 <= k <= n), by quickselect; reorders x. */
static int64_t topkast_kth_largest(int64_t *x, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n - 1, want = k - 1; /* the index the answer has in descending order */
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2, a = x[lo], b = x[mid], c = x[hi];
    int64_t pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b)); /* median of three */
    int64_t i = lo, j = hi;
    while (i <= j) { /* descending: larger values to the left */
      while (x[i] > pivot) i++;
      while (x[j] < pivot) j--;
      if (i <= j) {
        int64_t t = x[i];
        x[i++] = x[j];
        x[j--] = t;
      }
    }
    if (want <= j)
      hi = j;
    else if (want >= i)
      lo = i;
    else
      return x[want]; /* between j and i every value equals the pivot */
  }
  return x[lo];
}

/* Splits [0, n) evenly over the threads; each calls its part. */
static inline void thread_part(int64_t n, int64_t *lo, int64_t *hi) {
  int64_t parts = 1, part = 0;
#ifdef _OPENMP
  parts = omp_get_num_threads();
  part = omp_get_thread_num();
#endif
  *lo = n * part / parts;
  *hi = n * (part + 1) / parts;
}

#define T float
#define U uint32_t
#define S int32_t
#define ABS_MASK 0x7fffffffu
#define INF_BITS 0x7f800000u
#define NAME(x) topkast_##x##_f32
#include "_kernels_impl.h"
#undef T
#undef U
#undef S
#undef ABS_MASK
#undef INF_BITS
#undef NAME

#define T double
#define U uint64_t
#define S int64_t
#define ABS_MASK 0x7fffffffffffffffull
#define INF_BITS 0x7ff0000000000000ull
#define NAME(x) topkast_##x##_f64
#include "_kernels_impl.h"
