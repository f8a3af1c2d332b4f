"""C source of the routed-expert MLP kernel (compiled at first use by `engine.kernels.cpu.build`).

Kept as a Python string so it ships with the package without package-data rules. Layout and math are
documented in `engine.kernels.cpu.moe_mlp`; the C side trusts the shapes the Python wrapper has checked and
only validates `offsets` (it reads them anyway).

Work split: stage 1 (a = route_w * swiglu(x W1^T, x W3^T)) cuts each expert's I rows of W1/W3 into 2T parts
(T threads), stage 2 (y = a W2^T) each expert's D rows of W2; threads claim (expert, part) items in order from
a shared counter, with a barrier between the stages, so a thread that is descheduled does not hold the other
up. The inner block computes nw x nr dot products (nw weight rows against nr activation rows, all partial sums
in registers) with GCC vector extensions, which compile to AVX-512, AVX2 or SSE depending on -march, so the
same source is portable; the next weight blocks are prefetched into L2 so DRAM streams while the core computes.

Quantized weights (FP4, FP8, BF16) go through the same stages and threads with their own inner block
(`engine.kernels.cpu.quant_src`): each weight vector is decoded from its bytes and scale in registers.
"""

from engine.kernels.cpu.attn_src import ATTN_SOURCE
from engine.kernels.cpu.mhc_src import MHC_SOURCE
from engine.kernels.cpu.norm_src import NORM_SOURCE
from engine.kernels.cpu.quant_src import QUANT_ENTRIES, QUANT_SOURCE
from engine.kernels.cpu.rope_src import ROPE_SOURCE

_HEAD = r"""
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* VW: floats per vector. A block is two weight rows (row i of W1 and of W3 in stage 1, rows d and d+1 of W2 in
   stage 2: two sequential streams) against NR activation rows; its 2*NR accumulators must fit the vector
   registers: 24 of 32 zmm with AVX-512, 12 of 16 with AVX2/SSE. */
#if defined(__AVX512F__)
#define VW 16
#define NR 12
#define ROWS ROWS_12
#else
#if defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
#define NR 6
#define ROWS ROWS_6
#endif
#define DB 2
#define NRMAX 12
#ifndef PFB
#define PFB 4 /* prefetch distance, in weight blocks */
#endif
#ifndef PFL
#define PFL 2 /* prefetch locality hint: 2 = into L2 (more misses in flight than L1 allows) */
#endif
#define NWMAX 2
#define RC 96
#define MAXT 64

typedef float vf __attribute__((vector_size(VW * sizeof(float))));

/* Keep a loaded vector in a register: otherwise gcc folds the load into every FMA that uses it, which makes
   the block load-bound (nw loads of the same x vector per step instead of one). */
#if defined(__x86_64__) && defined(__GNUC__)
#define PIN(v) __asm__("" : "+v"(v))
#else
#define PIN(v) ((void)0)
#endif

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Sum of the lanes of v, by halving (log2(VW) adds instead of VW - 1 dependent ones). */
static inline float hsum(vf v) {
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector) && !defined(HSUM_SCALAR)
#if VW == 16
    typedef float v8 __attribute__((vector_size(32)));
    v8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif VW == 8
    typedef float v8 __attribute__((vector_size(32)));
    v8 h8 = v;
#endif
#if VW >= 8
    typedef float v4 __attribute__((vector_size(16)));
    v4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
#else
    typedef float v4 __attribute__((vector_size(16)));
    v4 h4 = v;
#endif
    v4 h2 = h4 + __builtin_shufflevector(h4, h4, 2, 3, 0, 1);
    return h2[0] + h2[1];
#else
    float s = 0.0f;
    for (int l = 0; l < VW; l++) s += v[l];
    return s;
#endif
}

/* out[a * NRMAX + r] = sum_k w[a][k] * x[r * ldx + k] for a < nw, r < nr. When pf != 0, also prefetch
   w[a] + pf (the weight block the caller reads next) one cache line per step, so the weight stream,
   not the core, sets the pace. */
static inline __attribute__((always_inline)) void dots(const float *const *w, const int nw, const float *x,
                                                      const int64_t ldx, const int nr, const int64_t K,
                                                      const int64_t pf, float *out) {
    vf acc[NWMAX][NRMAX];
    for (int a = 0; a < nw; a++)
        for (int r = 0; r < nr; r++) acc[a][r] = (vf){0};
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
        vf wv[NWMAX];
        for (int a = 0; a < nw; a++) wv[a] = vload(w[a] + k);
        if (pf)
            for (int a = 0; a < nw; a++) __builtin_prefetch(w[a] + pf + k, 0, PFL);
        for (int r = 0; r < nr; r++) {
            vf xv = vload(x + r * ldx + k);
            PIN(xv);
            for (int a = 0; a < nw; a++) acc[a][r] += wv[a] * xv;
        }
    }
    for (int a = 0; a < nw; a++) {
        for (int r = 0; r < nr; r++) {
            float s = hsum(acc[a][r]);
            for (int64_t kk = k; kk < K; kk++) s += w[a][kk] * x[r * ldx + kk];
            out[a * NRMAX + r] = s;
        }
    }
}

/* Instantiations of `dots` for every (nw, nr) a stage uses, so that both are compile-time constants. */
#define CALL(NW, NRC) case NRC: dots(w, NW, x, ldx, NRC, K, pf, out); break;
#define ROWS_6(NW) CALL(NW, 1) CALL(NW, 2) CALL(NW, 3) CALL(NW, 4) CALL(NW, 5) CALL(NW, 6)
#define ROWS_12(NW) ROWS_6(NW) CALL(NW, 7) CALL(NW, 8) CALL(NW, 9) CALL(NW, 10) CALL(NW, 11) CALL(NW, 12)

static void dots_stage1(const float *const *w, const float *x, int64_t ldx, int nr, int64_t K, int64_t pf,
                        float *out) {
    switch (nr) { ROWS(2) }
}

static void dots_stage2(const float *const *w, int nw, const float *x, int64_t ldx, int nr, int64_t K, int64_t pf,
                        float *out) {
    if (nw == 2) {
        switch (nr) { ROWS(2) }
    } else {
        switch (nr) { ROWS(1) }
    }
}

typedef struct {
    const float *x, *route_w, *w1, *w3, *w2;
    const uint8_t *q1, *q3, *q2, *s1, *s3, *s2; /* quantized weights and their scales (fmt != FMT_F32) */
    int fmt, sfmt;                              /* weight format, scale format (see the FMT_ and SC_ codes) */
    int stages;                                 /* bit 0: run stage 1, bit 1: stage 2 */
    const int64_t *off;
    float *a, *y;
    int64_t S, D, I;
    float limit;
    int nthreads;
    int64_t parts;        /* each expert's rows of W1/W3 (stage 1) and of W2 (stage 2) split in `parts` items */
    int64_t next1, next2; /* next unclaimed item of each stage (threads claim items in order) */
    volatile int arrived;
    volatile int done;
} job_t;

static inline float swiglu(float g, float u, float limit) {
    g = g > limit ? limit : g;
    u = u > limit ? limit : (u < -limit ? -limit : u);
    return g / (1.0f + expf(-g)) * u;
}

static inline void split(int64_t nblocks, int64_t bs, int64_t total, int t, int T, int64_t *lo, int64_t *hi) {
    int64_t b0 = nblocks * t / T, b1 = nblocks * (t + 1) / T;
    *lo = b0 * bs;
    *hi = b1 * bs < total ? b1 * bs : total;
}

/* Stage 1 for expert s, weight rows [i0, i1): a = route_w * swiglu(x W1^T, x W3^T). */
static void stage1(const job_t *j, int64_t s, int64_t i0, int64_t i1) {
    const int64_t D = j->D, I = j->I;
    const int64_t r0 = j->off[s], n = j->off[s + 1] - r0;
    float out[NWMAX * NRMAX];
    for (int64_t rc = 0; rc < n; rc += RC) {
        const int64_t nrc = n - rc < RC ? n - rc : RC;
        for (int64_t i = i0; i < i1; i++) {
            const float *w[2] = {j->w1 + (s * I + i) * D, j->w3 + (s * I + i) * D};
            for (int64_t r = 0; r < nrc; r += NR) {
                const int nr = nrc - r < NR ? (int)(nrc - r) : NR;
                const int64_t row = r0 + rc + r;
                dots_stage1(w, j->x + row * D, D, nr, D, r == 0 ? PFB * D : 0, out);
                for (int rr = 0; rr < nr; rr++)
                    j->a[(row + rr) * I + i] = swiglu(out[rr], out[NRMAX + rr], j->limit) * j->route_w[row + rr];
            }
        }
    }
}

/* Stage 2 for expert s, output columns [d0, d1): y = a W2^T. */
static void stage2(const job_t *j, int64_t s, int64_t d0, int64_t d1) {
    const int64_t D = j->D, I = j->I;
    const int64_t r0 = j->off[s], n = j->off[s + 1] - r0;
    const float *w2s = j->w2 + s * D * I;
    float out[NWMAX * NRMAX];
    for (int64_t rc = 0; rc < n; rc += RC) {
        const int64_t nrc = n - rc < RC ? n - rc : RC;
        for (int64_t d = d0; d < d1; d += DB) {
            const int nd = d1 - d >= DB ? DB : (int)(d1 - d);
            const float *w[NWMAX];
            for (int q = 0; q < nd; q++) w[q] = w2s + (d + q) * I;
            for (int64_t r = 0; r < nrc; r += NR) {
                const int nr = nrc - r < NR ? (int)(nrc - r) : NR;
                const int64_t row = r0 + rc + r;
                dots_stage2(w, nd, j->a + row * I, I, nr, I, r == 0 ? PFB * DB * I : 0, out);
                for (int q = 0; q < nd; q++)
                    for (int rr = 0; rr < nr; rr++) j->y[(row + rr) * D + d + q] = out[q * NRMAX + rr];
            }
        }
    }
}

"""

_TAIL = r"""
/* Claim (expert, part) items of one stage until none is left; items of empty experts are skipped. */
static void run_stage(job_t *j, int stage) {
    const int64_t P = j->parts, n_items = j->S * P;
    int64_t *next = stage == 1 ? &j->next1 : &j->next2;
    const int64_t len = stage == 1 ? j->I : j->D, bs = stage == 1 ? 1 : DB;
    for (;;) {
        const int64_t c = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
        if (c >= n_items) break;
        const int64_t s = c / P;
        if (j->off[s + 1] == j->off[s]) continue;
        int64_t lo, hi;
        split((len + bs - 1) / bs, bs, len, (int)(c % P), (int)P, &lo, &hi);
        if (stage == 1) (j->fmt == FMT_F32 ? stage1 : stage1q)(j, s, lo, hi);
        else (j->fmt == FMT_F32 ? stage2 : stage2q)(j, s, lo, hi);
    }
}

/* Threads worth using: 1 when the call would take under ~50 us on one core (waking a second thread and
   meeting it at the barrier costs a good part of that); estimate: weights of non-empty experts at ~20 B/ns
   plus the FLOPs at ~40 FLOP/ns. */
static int useful_threads(const int64_t *off, int64_t S, int64_t N, int64_t D, int64_t I, int nthreads) {
    int64_t active = 0;
    for (int64_t s = 0; s < S; s++) active += off[s + 1] > off[s];
    const double est_ns = (double)active * 3 * D * I * 4 / 20.0 + (double)N * 6 * D * I / 40.0;
    if (nthreads < 1 || est_ns < 50e3) return 1;
    return nthreads > MAXT ? MAXT : nthreads;
}

static int check_offsets(const int64_t *off, int64_t S, int64_t N) {
    if (off[0] != 0 || off[S] != N) return -1;
    for (int64_t s = 0; s < S; s++)
        if (off[s + 1] < off[s]) return -1;
    return 0;
}

#ifdef MEGASERVE_OMP
/* Threads from the OpenMP runtime torch already loaded (same libgomp, hence torch's own pool). */
#include <omp.h>

/* Runs job j (single-threaded as built) on up to `nthreads` threads. */
static void run_job(job_t *j, int nthreads) {
    j->nthreads = nthreads;
    j->parts = 2 * nthreads;
#pragma omp parallel num_threads(nthreads)
    {
        if (j->stages & 1) run_stage(j, 1);
#pragma omp barrier
        if (j->stages & 2) run_stage(j, 2);
    }
}

#else
/* A private persistent pool of pthreads (used where torch does not run on libgomp). */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void wait_count(volatile int *counter, int target) {
    int spins = 0;
    while (__atomic_load_n(counter, __ATOMIC_ACQUIRE) < target) {
        if (++spins < 4000) cpu_relax();
        else sched_yield();
    }
}

static void run_part(job_t *j, int t) {
    (void)t;
    if (j->stages & 1) run_stage(j, 1);
    if (j->nthreads > 1) {
        __atomic_add_fetch(&j->arrived, 1, __ATOMIC_ACQ_REL);
        wait_count(&j->arrived, j->nthreads);
    }
    if (j->stages & 2) run_stage(j, 2);
    __atomic_add_fetch(&j->done, 1, __ATOMIC_ACQ_REL);
}

/* Persistent worker pool: workers 1..pool_n sleep on pool_cv until pool_gen changes. */
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static job_t *pool_job;
static int pool_nthreads;
static unsigned long pool_gen;
static int pool_n;
static pid_t pool_pid;
static struct { int tid; unsigned long seen; } worker_arg[MAXT];

static void *worker_main(void *p) {
    const int tid = ((int *)p)[0];
    unsigned long seen = worker_arg[tid].seen;
    for (;;) {
        pthread_mutex_lock(&pool_mu);
        while (pool_gen == seen) pthread_cond_wait(&pool_cv, &pool_mu);
        seen = pool_gen;
        job_t *j = tid < pool_nthreads ? pool_job : NULL; /* a job this worker is not part of may be gone */
        pthread_mutex_unlock(&pool_mu);
        if (j) run_part(j, tid);
    }
    return NULL;
}

static int ensure_workers(int want) {
    if (pool_pid != getpid()) { /* forked child: the parent's workers do not exist here */
        pool_n = 0;
        pool_pid = getpid();
    }
    while (pool_n < want && pool_n + 1 < MAXT) {
        const int tid = pool_n + 1;
        worker_arg[tid].tid = tid;
        worker_arg[tid].seen = pool_gen;
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&th, &attr, worker_main, &worker_arg[tid]);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool_n = tid;
    }
    return pool_n;
}

/* Runs job j (single-threaded as built) on this thread plus up to nthreads - 1 pool workers. */
static void run_job(job_t *j, int nthreads) {
    pthread_mutex_lock(&call_mu);
    if (nthreads > 1) {
        const int have = ensure_workers(nthreads - 1);
        j->nthreads = have + 1 < nthreads ? have + 1 : nthreads;
        j->parts = 2 * j->nthreads;
        pthread_mutex_lock(&pool_mu);
        pool_job = j;
        pool_nthreads = j->nthreads;
        pool_gen++;
        pthread_cond_broadcast(&pool_cv);
        pthread_mutex_unlock(&pool_mu);
    }
    run_part(j, 0);
    wait_count(&j->done, j->nthreads);
    pthread_mutex_unlock(&call_mu);
}
#endif

/* The one entry point. Returns 0 on success, -1 when offsets are not 0 = off[0] <= ... <= off[S] = N. */
int megaserve_moe_mlp(const float *x, const int64_t *off, const float *route_w, const float *w1, const float *w3,
                      const float *w2, float *a, float *y, int64_t N, int64_t S, int64_t D, int64_t I, float limit,
                      int nthreads) {
    if (check_offsets(off, S, N)) return -1;
    if (N == 0) return 0;
    job_t j = {.x = x, .route_w = route_w, .w1 = w1, .w3 = w3, .w2 = w2, .off = off, .a = a, .y = y, .S = S,
               .D = D, .I = I, .limit = limit, .nthreads = 1, .parts = 1, .fmt = FMT_F32, .stages = 3};
    run_job(&j, useful_threads(off, S, N, D, I, nthreads));
    return 0;
}
"""

SOURCE = _HEAD + QUANT_SOURCE + _TAIL + QUANT_ENTRIES + MHC_SOURCE + NORM_SOURCE + ROPE_SOURCE + ATTN_SOURCE
