"""C source of the lightning indexer's streamed top-k (compiled at first use by `engine.kernels.cpu.build`).

For every query t (n of them) it scores every entry i < n_visible[t] of a paged key pool and keeps the k best:

    score[t, i] = sum_h w[t, h] * max(q[t, h] . K[i], 0)        (w already holds the di^-0.5 scale)

No score matrix is written: a tile of TILE entries is gathered through the page table and transposed once
(entries across vector lanes), then every query of a block of QB queries scores it, 16 entries per vector and
16 heads per group of accumulators (all in registers; the caller lays q out as [n, H/16, di, 16]), and pushes
the scores above its current k-th best into its own min-heap of k (value, index) pairs. GCC vector extensions
compile to AVX-512, AVX2 or SSE depending on -march. Query blocks run in parallel on torch's OpenMP pool when
built with MEGASERVE_OMP, serially otherwise.
Ties at the k-th score keep the entry seen first (the lower index).
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef MEGASERVE_OMP
#include <omp.h>
#endif

#define LANES 16   /* entries per vector */
#define HG 16      /* heads per group of accumulators (the caller pads heads to a multiple) */
#define TILE 128   /* entries per transposed tile */
#define QB 32      /* queries per block (one block per task) */

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

static void heap_push(float *val, int64_t *idx, int64_t *size, int64_t k, float s, int64_t i) {
    int64_t c;
    if (*size < k) {  /* not full: sift up */
        c = (*size)++;
        while (c > 0) {
            int64_t p = (c - 1) / 2;
            if (val[p] <= s) break;
            val[c] = val[p]; idx[c] = idx[p]; c = p;
        }
        val[c] = s; idx[c] = i;
        return;
    }
    if (!(s > val[0])) return;
    c = 0;  /* replace the root (the k-th best), sift down */
    for (;;) {
        int64_t l = 2 * c + 1, r = l + 1, m;
        if (l >= k) break;
        m = (r < k && val[r] < val[l]) ? r : l;
        if (val[m] >= s) break;
        val[c] = val[m]; idx[c] = idx[m]; c = m;
    }
    val[c] = s; idx[c] = i;
}

/* Score the nv_tile entries of one transposed tile (kt: [TILE/LANES][d][LANES]) for query t. */
static void score_tile(const float *qt, const float *wt, const float *kt, int64_t h, int64_t d, int64_t e0,
                       int64_t lim, int64_t k, float *val, int64_t *idx, int64_t *size) {
    const v16 zero = {0};
    for (int64_t jv = 0; jv * LANES < lim; jv++) {
        v16 s = zero;
        const float *kv = kt + jv * d * LANES;
        for (int64_t hg = 0; hg < h; hg += HG) {
            v16 acc[HG];
            for (int g = 0; g < HG; g++) acc[g] = zero;
            const float *qh = qt + hg * d;  /* this group's [d][HG] block */
            for (int64_t dd = 0; dd < d; dd++) {
                v16 kk = *(const v16 *)(kv + dd * LANES);
                const float *qd = qh + dd * HG;
                for (int g = 0; g < HG; g++) acc[g] += qd[g] * kk;
            }
            for (int g = 0; g < HG; g++) {
                vi16 pos = acc[g] > zero;
                s += wt[hg + g] * (v16)((vi16)acc[g] & pos);
            }
        }
        float thresh = *size < k ? -INFINITY : val[0];
        int64_t n_l = lim - jv * LANES < LANES ? lim - jv * LANES : LANES;
        for (int64_t l = 0; l < n_l; l++) {
            if (s[l] > thresh) {
                heap_push(val, idx, size, k, s[l], e0 + jv * LANES + l);
                thresh = *size < k ? -INFINITY : val[0];
            }
        }
    }
}

static void run_block(int64_t b, const float *q, const float *w, const float *pool, const int64_t *table,
                      const int64_t *nvis, int64_t n, int64_t h, int64_t d, int64_t per_page, int64_t k,
                      float *out_val, int64_t *out_idx, float *kt) {
    int64_t t0 = b * QB, t1 = t0 + QB < n ? t0 + QB : n, vmax = 0;
    int64_t size[QB];
    for (int64_t t = t0; t < t1; t++) {
        size[t - t0] = 0;
        if (nvis[t] > vmax) vmax = nvis[t];
    }
    for (int64_t e0 = 0; e0 < vmax; e0 += TILE) {
        int64_t ne = vmax - e0 < TILE ? vmax - e0 : TILE;
        int64_t nvec = (ne + LANES - 1) / LANES;
        for (int64_t j = 0; j < nvec * LANES; j++) {  /* gather + transpose; lanes past ne are zero */
            float *dst = kt + (j / LANES) * d * LANES + j % LANES;
            if (j < ne) {
                int64_t i = e0 + j;
                const float *src = pool + (table[i / per_page] * per_page + i % per_page) * d;
                for (int64_t dd = 0; dd < d; dd++) dst[dd * LANES] = src[dd];
            } else {
                for (int64_t dd = 0; dd < d; dd++) dst[dd * LANES] = 0.0f;
            }
        }
        for (int64_t t = t0; t < t1; t++) {
            if (nvis[t] <= e0) continue;
            int64_t lim = nvis[t] - e0 < ne ? nvis[t] - e0 : ne;
            score_tile(q + t * h * d, w + t * h, kt, h, d, e0, lim, k, out_val + t * k, out_idx + t * k,
                       &size[t - t0]);
        }
    }
    for (int64_t t = t0; t < t1; t++)
        for (int64_t j = size[t - t0]; j < k; j++) {
            out_val[t * k + j] = -INFINITY;
            out_idx[t * k + j] = 0;
        }
}

/* q [n, h/HG, d, HG] (each group of HG heads transposed), w [n, h], pool [*, per_page, d] (float32,
   contiguous), table [pages] int64, nvis [n] int64;
   out_val [n, k] float32, out_idx [n, k] int64 (unordered; -inf / 0 where fewer than k are visible).
   Returns 0, or -1 when h is not a multiple of HG or a buffer cannot be allocated. */
int megaserve_index_topk(const float *q, const float *w, const float *pool, const int64_t *table,
                         const int64_t *nvis, int64_t n, int64_t h, int64_t d, int64_t per_page, int64_t k,
                         float *out_val, int64_t *out_idx, int nthreads) {
    if (h % HG || k < 1) return -1;
    int64_t nb = (n + QB - 1) / QB;
    size_t buf = (size_t)TILE * (size_t)d * sizeof(float);
    int failed = 0;
#ifdef MEGASERVE_OMP
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
#endif
    {
        float *kt = aligned_alloc(64, (buf + 63) / 64 * 64);
        if (!kt) failed = 1;
#ifdef MEGASERVE_OMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t b = 0; b < nb; b++)
            if (kt) run_block(b, q, w, pool, table, nvis, n, h, d, per_page, k, out_val, out_idx, kt);
        free(kt);
    }
    return failed ? -1 : 0;
}
"""
