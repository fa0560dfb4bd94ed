// sparsebench native CSR kernels for truly sparse nn.Linear training (issue 14).
//
// W is (out, in) in CSR: crow (out + 1, int32), col (nnz, int16 or int32), val (nnz, float32), row-major.
// Activations are feature-major: xT (in, B) with row stride ldx, dyT (out, B), yT (out, B), dxT (in, B);
// the batch is the contiguous axis, so one row of W works on whole rows of 16-float AVX-512 vectors.
//
//   sb_spmm   yT[i, :]  = sum_k val[k] * xT[col[k], :]                      (y = x W^T, a gather per row)
//   sb_bwd    dxT[j, :] += val[k] * dyT[i, :]  for every k = (i, j)          (dx = dy W, a scatter: no W^T)
//             dv[k]      = <dyT[i, :], xT[j, :]>                             (SDDMM, fused in the same pass)
//   sb_sddmm  dv only, row-parallel.
//
// The backward splits the batch into equal column chunks, one set per thread (threads never write the
// same dx element); each thread keeps its own dv partial, summed at the end. Built by
// sparsebench.sparsity.native with -O3 -march=native -fopenmp; needs AVX-512F.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <immintrin.h>

#ifndef __AVX512F__
#error "sparsebench native kernels need AVX-512F"
#endif

#define PF 4  // prefetch distance in non-zeros
#define MAX_CHUNK 128  // 8 vectors: the widest register block DISPATCH instantiates

static inline int clamp_chunk(int chunk) { return chunk < 1 ? 1 : (chunk > MAX_CHUNK ? MAX_CHUNK : chunk); }

static inline __mmask16 lane_mask(int rem) {
    return rem >= 16 ? (__mmask16)0xFFFF : (rem > 0 ? (__mmask16)((1u << rem) - 1) : (__mmask16)0);
}

template <int NV, typename I>
static inline void fwd_row(const int32_t* crow, const I* col, const float* val, int64_t i,
                           const float* xT, int64_t ldx, float* yT, int64_t ldy, int w) {
    __m512 a[NV];
    __mmask16 m[NV];
    for (int v = 0; v < NV; ++v) { a[v] = _mm512_setzero_ps(); m[v] = lane_mask(w - 16 * v); }
    const int32_t k1 = crow[i + 1];
    for (int32_t k = crow[i]; k < k1; ++k) {
        const float* xr = xT + (int64_t)col[k] * ldx;
        if (k + PF < k1) {
            const char* p = (const char*)(xT + (int64_t)col[k + PF] * ldx);
            for (int v = 0; v < NV; ++v) _mm_prefetch(p + 64 * v, _MM_HINT_T0);
        }
        const __m512 s = _mm512_set1_ps(val[k]);
        for (int v = 0; v < NV - 1; ++v) a[v] = _mm512_fmadd_ps(s, _mm512_loadu_ps(xr + 16 * v), a[v]);
        a[NV - 1] = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(m[NV - 1], xr + 16 * (NV - 1)), a[NV - 1]);
    }
    float* yr = yT + i * ldy;
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(yr + 16 * v, m[v], a[v]);
}

// one row i of W over one batch chunk of width w: dx scatter (DX) and / or dv dot products (DV)
template <int NV, bool DX, bool DV, typename I>
static inline void bwd_row(const int32_t* crow, const I* col, const float* val, int64_t i,
                           const float* xT, int64_t ldx, const float* dyT, int64_t ldd, float* dxT, int64_t ldo,
                           float* dv, int w) {
    __m512 d[NV];
    __mmask16 m[NV];
    const float* dr = dyT + i * ldd;
    for (int v = 0; v < NV; ++v) { m[v] = lane_mask(w - 16 * v); d[v] = _mm512_maskz_loadu_ps(m[v], dr + 16 * v); }
    const int32_t k1 = crow[i + 1];
    for (int32_t k = crow[i]; k < k1; ++k) {
        const int64_t r = col[k];
        if (k + PF < k1) {
            const int64_t rp = col[k + PF];
            for (int v = 0; v < NV; ++v) {
                if (DX) _mm_prefetch((const char*)(dxT + rp * ldo) + 64 * v, _MM_HINT_T0);
                if (DV) _mm_prefetch((const char*)(xT + rp * ldx) + 64 * v, _MM_HINT_T0);
            }
        }
        if (DX) {
            float* o = dxT + r * ldo;
            const __m512 s = _mm512_set1_ps(val[k]);
            for (int v = 0; v < NV - 1; ++v)
                _mm512_storeu_ps(o + 16 * v, _mm512_fmadd_ps(s, d[v], _mm512_loadu_ps(o + 16 * v)));
            _mm512_mask_storeu_ps(o + 16 * (NV - 1), m[NV - 1],
                                  _mm512_fmadd_ps(s, d[NV - 1], _mm512_maskz_loadu_ps(m[NV - 1], o + 16 * (NV - 1))));
        }
        if (DV) {
            const float* xr = xT + r * ldx;
            __m512 acc = _mm512_mul_ps(d[NV - 1], _mm512_maskz_loadu_ps(m[NV - 1], xr + 16 * (NV - 1)));
            for (int v = 0; v < NV - 1; ++v) acc = _mm512_fmadd_ps(d[v], _mm512_loadu_ps(xr + 16 * v), acc);
            dv[k] += _mm512_reduce_add_ps(acc);
        }
    }
}

#define DISPATCH(NVAR, CALL) switch (NVAR) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break; }

// chunk c of n equal chunks of a batch of B columns: [*lo, *lo + *w)
static inline void chunk_of(int64_t B, int64_t n, int64_t c, int64_t* lo, int* w) {
    const int64_t base = B / n, extra = B % n;
    *lo = c * base + (c < extra ? c : extra);
    *w = (int)(base + (c < extra ? 1 : 0));
}

// chunk c of n chunks made of whole 16-float vectors (the last one partial): [*lo, *lo + *w), *w <= 0 when
// there are more chunks than vectors. Boundaries on vector multiples keep two threads off one cache line of
// a row whose stride and base are multiples of 16 floats (the padded dx buffer).
static inline void vec_chunk_of(int64_t B, int64_t n, int64_t c, int64_t* lo, int* w) {
    const int64_t nvec = (B + 15) / 16, base = nvec / n, extra = nvec % n;
    *lo = 16 * (c * base + (c < extra ? c : extra));
    int64_t hi = *lo + 16 * (base + (c < extra ? 1 : 0));
    if (hi > B) hi = B;
    *w = (int)(hi - *lo);
}

template <typename I>
static void spmm_impl(int64_t out, int64_t B, const int32_t* crow, const I* col, const float* val,
                      const float* xT, int64_t ldx, float* yT, int64_t ldy, int chunk, int nthreads) {
    chunk = clamp_chunk(chunk);
    const int64_t n = (B + chunk - 1) / chunk;
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t t = 0; t < n * out; ++t) {
        const int64_t c = t / out, i = t % out;
        int64_t lo; int w;
        chunk_of(B, n, c, &lo, &w);
        const int nv = (w + 15) / 16;
#define F(NV) fwd_row<NV, I>(crow, col, val, i, xT + lo, ldx, yT + lo, ldy, w)
        DISPATCH(nv, F)
#undef F
    }
}

// dx scatter + dv: threads own disjoint column chunks of the batch (every row of W scatters into every
// dx row, so rows cannot be split); dv partials per thread, summed in thread order (deterministic).
template <bool DV, typename I>
static void bwd_impl(int64_t out, int64_t nnz, int64_t B, const int32_t* crow, const I* col, const float* val,
                     const float* xT, int64_t ldx, const float* dyT, int64_t ldd, float* dxT, int64_t ldo,
                     float* dv, int chunk, int nthreads) {
    chunk = clamp_chunk(chunk);
    const int64_t nvec = (B + 15) / 16, cvec = (chunk + 15) / 16;
    int T = nthreads < 1 ? 1 : nthreads;
    if ((int64_t)T > nvec) T = (int)nvec;
    float* part = NULL;
    if (DV && T > 1) {
        part = (float*)calloc((size_t)(T - 1) * (size_t)nnz, sizeof(float));
        if (!part) T = 1;  // no memory for partials: one thread
    }
    const int64_t n = (int64_t)T * ((nvec + (int64_t)T * cvec - 1) / ((int64_t)T * cvec));
    if (DV) memset(dv, 0, sizeof(float) * (size_t)nnz);
    #pragma omp parallel num_threads(T)
    {
        const int tid = omp_get_thread_num();
        float* mydv = (DV && tid > 0) ? part + (int64_t)(tid - 1) * nnz : dv;
        for (int64_t c = tid; c < n; c += T) {
            int64_t lo; int w;
            vec_chunk_of(B, n, c, &lo, &w);
            if (w <= 0) continue;
            const int nv = (w + 15) / 16;
            for (int64_t i = 0; i < out; ++i) {
#define F(NV) bwd_row<NV, true, DV, I>(crow, col, val, i, xT + lo, ldx, dyT + lo, ldd, dxT + lo, ldo, mydv, w)
                DISPATCH(nv, F)
#undef F
            }
        }
    }
    if (part) {
        for (int t = 0; t < T - 1; ++t) {
            const float* p = part + (int64_t)t * nnz;
            for (int64_t k = 0; k < nnz; ++k) dv[k] += p[k];
        }
        free(part);
    }
}

template <typename I>
static void sddmm_impl(int64_t out, int64_t B, const int32_t* crow, const I* col,
                       const float* xT, int64_t ldx, const float* dyT, int64_t ldd, float* dv, int chunk, int nthreads) {
    chunk = clamp_chunk(chunk);
    const int64_t n = (B + chunk - 1) / chunk;
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t i = 0; i < out; ++i) {
        for (int32_t k = crow[i]; k < crow[i + 1]; ++k) dv[k] = 0.f;
        for (int64_t c = 0; c < n; ++c) {
            int64_t lo; int w;
            chunk_of(B, n, c, &lo, &w);
            const int nv = (w + 15) / 16;
#define F(NV) bwd_row<NV, false, true, I>(crow, col, NULL, i, xT + lo, ldx, dyT + lo, ldd, NULL, 0, dv, w)
            DISPATCH(nv, F)
#undef F
        }
    }
}

// the CSR structure of W^T (in + 1 row pointers, out index of every weight in column-major order) and its
// values, by a counting sort over the columns: O(nnz + in), rows ascending within a column. A workspace
// for one backward call (the memory-lean layout keeps no transposed copy between steps).
template <typename I>
static void transpose_impl(int64_t out, int64_t in, const int32_t* crow, const I* col, const float* val,
                           int32_t* t_crow, int32_t* t_col, float* t_val) {
    memset(t_crow, 0, sizeof(int32_t) * (size_t)(in + 1));
    const int32_t nnz = crow[out];
    for (int32_t k = 0; k < nnz; ++k) t_crow[(int64_t)col[k] + 1]++;
    for (int64_t j = 0; j < in; ++j) t_crow[j + 1] += t_crow[j];
    int32_t* next = (int32_t*)malloc(sizeof(int32_t) * (size_t)(in > 0 ? in : 1));
    memcpy(next, t_crow, sizeof(int32_t) * (size_t)in);
    for (int64_t i = 0; i < out; ++i)
        for (int32_t k = crow[i]; k < crow[i + 1]; ++k) {
            const int32_t p = next[col[k]]++;
            t_col[p] = (int32_t)i;
            t_val[p] = val[k];
        }
    free(next);
}

// flat indices (ascending) of the entries of s[0 .. n) above tau: one AVX-512 compare pass, the hits' bit
// masks walked only where a vector has one (the grow criteria keep ~1% of a score block). Writes at most
// cap indices; returns the total count (a caller seeing count > cap asks again with more room).
static int64_t select_gt_impl(const float* s, int64_t n, float tau, int64_t* out, int64_t cap) {
    const __m512 t = _mm512_set1_ps(tau);
    int64_t c = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), t, _CMP_GT_OQ);
        while (m) {
            const int b = __builtin_ctz((unsigned)m);
            if (c < cap) out[c] = i + b;
            ++c;
            m &= (__mmask16)(m - 1);
        }
    }
    for (; i < n; ++i)
        if (s[i] > tau) { if (c < cap) out[c] = i; ++c; }
    return c;
}

extern "C" {
int sb_abi_version(void) { return 4; }
int64_t sb_select_gt(const float* s, int64_t n, float tau, int64_t* out, int64_t cap) {
    return select_gt_impl(s, n, tau, out, cap);
}
#define EXPORT(SUF, I) \
void sb_spmm_##SUF(int64_t out, int64_t B, const int32_t* crow, const I* col, const float* val, const float* xT, \
                   int64_t ldx, float* yT, int64_t ldy, int chunk, int nt) { \
    spmm_impl<I>(out, B, crow, col, val, xT, ldx, yT, ldy, chunk, nt); } \
void sb_bwd_##SUF(int64_t out, int64_t nnz, int64_t B, const int32_t* crow, const I* col, const float* val, \
                  const float* xT, int64_t ldx, const float* dyT, int64_t ldd, float* dxT, int64_t ldo, float* dv, \
                  int chunk, int nt) { \
    if (dv) bwd_impl<true, I>(out, nnz, B, crow, col, val, xT, ldx, dyT, ldd, dxT, ldo, dv, chunk, nt); \
    else bwd_impl<false, I>(out, nnz, B, crow, col, val, xT, ldx, dyT, ldd, dxT, ldo, dv, chunk, nt); } \
void sb_sddmm_##SUF(int64_t out, int64_t B, const int32_t* crow, const I* col, const float* xT, int64_t ldx, \
                    const float* dyT, int64_t ldd, float* dv, int chunk, int nt) { \
    sddmm_impl<I>(out, B, crow, col, xT, ldx, dyT, ldd, dv, chunk, nt); } \
void sb_transpose_##SUF(int64_t out, int64_t in, const int32_t* crow, const I* col, const float* val, int32_t* t_crow, \
                        int32_t* t_col, float* t_val) { transpose_impl<I>(out, in, crow, col, val, t_crow, t_col, t_val); }
EXPORT(i16, int16_t)
EXPORT(i32, int32_t)
}
