// sparsebench native CSR kernels for truly sparse nn.Linear training (issue 14).
//
// W is (out, in) in CSR: crow (out + 1, int32), col (nnz, int16 or int32), val (nnz, float32), row-major.
// Activations are feature-major: xT (in, B) with row stride ldx, dyT (out, B), yT (out, B), dxT (in, B);
// the batch is the contiguous axis, so one row of W works on whole rows of 16-float AVX-512 vectors.
//
//   sb_spmm   yT[i, :]  = bias[i] + sum_k val[k] * xT[col[k], :]            (y = x W^T + b, a gather per row)
//   sb_bwd    dxT[j, :]  = sum val[k] * dyT[i, :] over k = (i, j)            (dx = dy W, a scatter: no W^T)
//             dv[k]      = <dyT[i, :], xT[j, :]>                             (SDDMM, fused in the same pass)
//   sb_sddmm  dv only, row-parallel.
//   sb_select_gt / sb_select_vals / sb_drop_listed   the scores above a threshold, minus listed positions
//   sb_select_bound_bf16   the candidates of a bf16 score block above a threshold less a rounding bound
//             (topology updates' candidate selection)
//   sb_merge  the structure after a drop / grow: kept slots merged with the grown positions, one pass
//   sb_remap  values and optimizer state moved to the merged slots
//
// The backward splits the batch into equal column chunks, one set per thread (threads never write the
// same dx element); each thread keeps its own dv partial, summed at the end. Built by
// sparsebench.sparsity.native with -O3 -march=native -fopenmp; needs AVX-512F.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <immintrin.h>
#include <math.h>

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
static inline void fwd_row(const int32_t* crow, const I* col, const float* val, const float* bias, int64_t i,
                           const float* xT, int64_t ldx, float* yT, int64_t ldy, int w) {
    __m512 a[NV];
    __mmask16 m[NV];
    const __m512 b0 = bias ? _mm512_set1_ps(bias[i]) : _mm512_setzero_ps();
    for (int v = 0; v < NV; ++v) { a[v] = b0; m[v] = lane_mask(w - 16 * v); }
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
static void spmm_impl(int64_t out, int64_t B, const int32_t* crow, const I* col, const float* val, const float* bias,
                      const float* xT, int64_t ldx, float* yT, int64_t ldy, int chunk, int nthreads) {
    chunk = clamp_chunk(chunk);
    const int64_t n = (B + chunk - 1) / chunk;
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t t = 0; t < n * out; ++t) {
        const int64_t c = t / out, i = t % out;
        int64_t lo; int w;
        chunk_of(B, n, c, &lo, &w);
        const int nv = (w + 15) / 16;
#define F(NV) fwd_row<NV, I>(crow, col, val, bias, i, xT + lo, ldx, yT + lo, ldy, w)
        DISPATCH(nv, F)
#undef F
    }
}

#define SPLIT_WORK ((int64_t)2 << 20)  // non-zeros x batch below which the backward runs fused on one thread

// every row of W over the batch columns [lo, lo + w): the dx scatter and, with DV, the dv dots
template <bool DV, typename I>
static inline void bwd_columns(int64_t out, const int32_t* crow, const I* col, const float* val, int64_t lo, int w,
                               const float* xT, int64_t ldx, const float* dyT, int64_t ldd, float* dxT, int64_t ldo,
                               float* dv) {
    const int nv = (w + 15) / 16;
    for (int64_t i = 0; i < out; ++i) {
#define F(NV) bwd_row<NV, true, DV, I>(crow, col, val, i, xT + lo, ldx, dyT + lo, ldd, dxT + lo, ldo, dv, w)
        DISPATCH(nv, F)
#undef F
    }
}

// dv of row i of W over the whole batch, in nd chunks (one task of the row-parallel SDDMM)
template <typename I>
static inline void sddmm_row(int64_t i, int64_t B, int64_t nd, const int32_t* crow, const I* col,
                             const float* xT, int64_t ldx, const float* dyT, int64_t ldd, float* dv) {
    for (int32_t k = crow[i]; k < crow[i + 1]; ++k) dv[k] = 0.f;
    for (int64_t c = 0; c < nd; ++c) {
        int64_t lo; int w;
        chunk_of(B, nd, c, &lo, &w);
        const int nv = (w + 15) / 16;
#define F(NV) bwd_row<NV, false, true, I>(crow, col, NULL, i, xT + lo, ldx, dyT + lo, ldd, NULL, 0, dv, w)
        DISPATCH(nv, F)
#undef F
    }
}

// dx scatter + dv. One thread (or fewer than SPLIT_WORK products): one fused pass (dx scatter and dv dots per
// non-zero). Several: dx is split into disjoint column chunks of the batch among the first Tdx = T/2 threads
// (every row of W scatters into every dx row, so rows cannot be split), each scattering without dv; dv is
// computed row by row, whole rows of W per task (no partial sums, no reduction), by a dynamic loop all threads
// join, the dx threads when their scatter is done. Deterministic: every dx element and every dv entry is summed
// by one thread in a fixed order. Measured at batch 100, 2 threads: a 1000 x 1000 layer at 5% 800 us fused on
// one thread, 800 us with batch-split dv partials, 540 us split this way; at 1% (1M products) 195 us fused on
// one thread, 220 us split.
template <bool DV, typename I>
static void bwd_impl(int64_t out, int64_t nnz, int64_t B, const int32_t* crow, const I* col, const float* val,
                     const float* xT, int64_t ldx, const float* dyT, int64_t ldd, float* dxT, int64_t ldo,
                     float* dv, int chunk, int nthreads) {
    chunk = clamp_chunk(chunk);
    const int64_t nvec = (B + 15) / 16, cvec = (chunk + 15) / 16;
    int T = nthreads < 1 ? 1 : nthreads;
    if (T == 1 || nnz * B < SPLIT_WORK) {  // small layers: the fused pass on one thread is faster
        const int64_t n = (nvec + cvec - 1) / cvec;
        if (DV) memset(dv, 0, sizeof(float) * (size_t)nnz);
        for (int64_t c = 0; c < n; ++c) {
            int64_t lo; int w;
            vec_chunk_of(B, n, c, &lo, &w);
            if (w > 0) bwd_columns<DV, I>(out, crow, col, val, lo, w, xT, ldx, dyT, ldd, dxT, ldo, dv);
        }
        return;
    }
    int Tdx = DV ? T / 2 : T;
    if ((int64_t)Tdx > nvec) Tdx = (int)nvec;
    const int64_t n = (int64_t)Tdx * ((nvec + (int64_t)Tdx * cvec - 1) / ((int64_t)Tdx * cvec));
    const int64_t nd = (B + chunk - 1) / chunk;
    #pragma omp parallel num_threads(T)
    {
        const int tid = omp_get_thread_num();
        if (tid < Tdx) {
            for (int64_t c = tid; c < n; c += Tdx) {
                int64_t lo; int w;
                vec_chunk_of(B, n, c, &lo, &w);
                if (w > 0) bwd_columns<false, I>(out, crow, col, val, lo, w, xT, ldx, dyT, ldd, dxT, ldo, NULL);
            }
        }
        if (DV) {
            #pragma omp for schedule(dynamic, 16) nowait
            for (int64_t i = 0; i < out; ++i) sddmm_row<I>(i, B, nd, crow, col, xT, ldx, dyT, ldd, dv);
        }
    }
}

template <typename I>
static void sddmm_impl(int64_t out, int64_t B, const int32_t* crow, const I* col,
                       const float* xT, int64_t ldx, const float* dyT, int64_t ldd, float* dv, int chunk, int nthreads) {
    chunk = clamp_chunk(chunk);
    const int64_t nd = (B + chunk - 1) / chunk;
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t i = 0; i < out; ++i) sddmm_row<I>(i, B, nd, crow, col, xT, ldx, dyT, ldd, dv);
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


// packs the nt parts of a threaded select (part p: count[p] entries at idx / val + p * share; val may be NULL)
// to the front; returns the total, or -(room needed) when a part left fewer than slack free slots of its share
static int64_t pack_parts(int32_t* idx, float* val, int64_t share, const int64_t* count, int nt, int64_t slack) {
    int64_t total = 0, most = 0;
    for (int p = 0; p < nt; ++p) { total += count[p]; most = count[p] > most ? count[p] : most; }
    if (most + slack > share) return -((most + slack) * nt + nt);
    int64_t w = count[0];
    for (int p = 1; p < nt; ++p) {
        memmove(idx + w, idx + share * p, sizeof(int32_t) * (size_t)count[p]);
        if (val) memmove(val + w, val + share * p, sizeof(float) * (size_t)count[p]);
        w += count[p];
    }
    return total;
}

// The entries of s[0 .. n) above tau (ABS: |s| > tau), base + n < 2^31: their int32 positions base + i
// (ascending; base: a row block's offset in its matrix) and scores (ABS: |s|). nt threads over nt contiguous
// parts; part p writes into idx / val[p * (cap / nt) ..] and the parts are then packed to the front. One branch per 64 scores (none per hit): a group of four vectors
// with a hit compresses each vector's hits in registers and stores them whole (16 slots of room kept). 4M
// scores, one thread: 0.8% above 0.86 ms against 1.09 with a branch per vector and hit; 4.5% above 1.8 ms
// against 4.5.
// Returns the total count, or -(room needed) when a part overflowed its share of cap.
template <bool ABS>
static int64_t select_vals_impl(const float* s, int64_t n, float tau, int32_t base, int32_t* idx, float* val,
                                int64_t cap, int nt) {
    if (n < ((int64_t)1 << 16)) nt = 1;  // below 64k scores a thread team costs more than it saves
    if (nt < 1) nt = 1;
    if (nt > 64) nt = 64;
    const int64_t share = cap / nt;
    int64_t count[64];
    const __m512 t = _mm512_set1_ps(tau);
    const __m512i absm = _mm512_set1_epi32(0x7fffffff);
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int p = 0; p < nt; ++p) {
        int64_t i = (n * p / nt) & ~(int64_t)15, end = p + 1 == nt ? n : ((n * (p + 1) / nt) & ~(int64_t)15);
        int32_t* oi = idx + share * p;
        float* ov = val + share * p;
        int64_t c = 0;
#define SB_LOAD(V, OFF) __m512 V = _mm512_loadu_ps(s + i + (OFF)); \
        if (ABS) V = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(V), absm));
#define SB_STORE(V, M, OFF) \
        if (c + 16 <= share) { \
            _mm512_storeu_si512(oi + c, _mm512_maskz_compress_epi32(M, _mm512_add_epi32(iota, _mm512_set1_epi32((int32_t)(base + i + (OFF)))))); \
            _mm512_storeu_ps(ov + c, _mm512_maskz_compress_ps(M, V)); \
        } \
        c += __builtin_popcount((unsigned)(M));
        for (; i + 64 <= end; i += 64) {  // one branch per 64 scores; a group with a hit stores all four
            SB_LOAD(v0, 0) SB_LOAD(v1, 16) SB_LOAD(v2, 32) SB_LOAD(v3, 48)
            const __mmask16 m0 = _mm512_cmp_ps_mask(v0, t, _CMP_GT_OQ), m1 = _mm512_cmp_ps_mask(v1, t, _CMP_GT_OQ);
            const __mmask16 m2 = _mm512_cmp_ps_mask(v2, t, _CMP_GT_OQ), m3 = _mm512_cmp_ps_mask(v3, t, _CMP_GT_OQ);
            if (!(m0 | m1 | m2 | m3)) continue;
            SB_STORE(v0, m0, 0) SB_STORE(v1, m1, 16) SB_STORE(v2, m2, 32) SB_STORE(v3, m3, 48)
        }
        for (; i + 16 <= end; i += 16) {
            SB_LOAD(v, 0)
            const __mmask16 m = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ);
            SB_STORE(v, m, 0)
        }
#undef SB_LOAD
#undef SB_STORE
        for (; i < end; ++i) {
            const float v = ABS ? fabsf(s[i]) : s[i];
            if (v > tau) { if (c < share) { oi[c] = (int32_t)(base + i); ov[c] = v; } ++c; }
        }
        count[p] = c;
    }
    return pack_parts(idx, val, share, count, nt, 16);
}


// The candidates of a block of bf16 scores (rows x n_in, row-major, the bf16 bit patterns): the positions
// base + r * n_in + j (int32, ascending) where |s[r, j]| + rb[r] * cb[j] > tau, rb and cb the per-row and
// per-column factors of the scores' rounding bound (the exact scores above tau are all candidates when
// |s - exact| <= rb[r] * cb[j]). nt threads over contiguous row ranges, packed as in select_vals_impl.
// Returns the count, or -(room needed) when a part overflowed its share of cap.
static inline __m512 bf16x16_abs(const uint16_t* p) {
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
    return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(0x7fffffff)));
}
static inline float bf16_abs(uint16_t b) {
    const uint32_t w = ((uint32_t)b << 16) & 0x7fffffffu;
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}
static int64_t select_bound_bf16_impl(const uint16_t* s, int64_t rows, int64_t n_in, float tau, const float* rb,
                                      const float* cb, int32_t base, int32_t* idx, int64_t cap, int nt) {
    if (rows * n_in < ((int64_t)1 << 16)) nt = 1;
    if (nt < 1) nt = 1;
    if (nt > 64) nt = 64;
    const int64_t share = cap / nt;
    int64_t count[64];
    const __m512 t = _mm512_set1_ps(tau);
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int p = 0; p < nt; ++p) {
        int32_t* oi = idx + share * p;
        int64_t c = 0;
        for (int64_t r = rows * p / nt; r < rows * (p + 1) / nt; ++r) {
            const uint16_t* sr = s + r * n_in;
            const __m512 vr = _mm512_set1_ps(rb[r]);
            const int32_t at = base + (int32_t)(r * n_in);
            int64_t j = 0;
            // the 16 candidates at column o: |s| + rb[r] * cb[o ..] > tau; their positions compressed to oi + w
            auto hits = [&](int64_t o) {
                return _mm512_cmp_ps_mask(_mm512_fmadd_ps(vr, _mm512_loadu_ps(cb + o), bf16x16_abs(sr + o)), t, _CMP_GT_OQ);
            };
            auto store = [&](__mmask16 m, int64_t o, int64_t w) {
                _mm512_storeu_si512(oi + w, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32(at + (int32_t)o))));
            };
            for (; j + 32 <= n_in; j += 32) {  // one branch per 32 scores
                const __mmask16 m0 = hits(j), m1 = hits(j + 16);
                if (!(m0 | m1)) continue;
                const int c0 = __builtin_popcount((unsigned)m0);
                if (c + 32 <= share) {
                    store(m0, j, c);
                    store(m1, j + 16, c + c0);
                }
                c += c0 + __builtin_popcount((unsigned)m1);
            }
            for (; j < n_in; ++j)
                if (bf16_abs(sr[j]) + rb[r] * cb[j] > tau) { if (c < share) oi[c] = at + (int32_t)j; ++c; }
        }
        count[p] = c;
    }
    return pack_parts(idx, NULL, share, count, nt, 32);
}

// The structure after a topology update: the kept slots (all but drop, ascending distinct slot indices)
// merged row by row with grow (ascending flat positions row * in + col). Writes new_crow (out + 1), new_col
// and src (cap entries: the old slot of a kept entry, -1 for a grown one). Per row, the kept entries are
// compacted and merged with the grown ones without data-dependent branches (selects), so the O(nnz + out)
// pass does not stall on mispredictions. Returns 0; 1: a grown position repeats or is a kept active one;
// 2: a grown position out of range; 3: drop not ascending / distinct / in range; 4: more than cap entries.
template <typename I>
static int merge_impl(int64_t out, int64_t in, const int32_t* crow, const I* col, const int64_t* drop,
                      int64_t ndrop, const int64_t* grow, int64_t ngrow, int32_t* new_crow, I* new_col,
                      int32_t* src, int64_t cap) {
    const int32_t nnz = crow[out];
    if (ngrow && (grow[0] < 0 || grow[ngrow - 1] >= out * in)) return 2;
    for (int64_t d = 0; d < ndrop; ++d)
        if (drop[d] < 0 || drop[d] >= nnz || (d && drop[d] <= drop[d - 1])) return 3;
    if ((int64_t)nnz - ndrop + ngrow > cap) return 4;
    for (int64_t g = 1; g < ngrow; ++g)
        if (grow[g] == grow[g - 1]) return 1;
    int32_t maxrow = 0;
    for (int64_t i = 0; i < out; ++i) maxrow = crow[i + 1] - crow[i] > maxrow ? crow[i + 1] - crow[i] : maxrow;
    int64_t* kc = (int64_t*)malloc(sizeof(int64_t) * (size_t)(maxrow + 1));
    int32_t* ks = (int32_t*)malloc(sizeof(int32_t) * (size_t)(maxrow + 1));
    int64_t d = 0, g = 0, w = 0;
    int bad = 0;
    new_crow[0] = 0;
    for (int64_t i = 0; i < out; ++i) {
        const int64_t base = i * in;
        int64_t na = 0;
        for (int32_t k = crow[i]; k < crow[i + 1]; ++k) {  // kept entries of the row, compacted
            const int dropped = d < ndrop && drop[d] == k;
            kc[na] = (int64_t)col[k]; ks[na] = k;
            na += !dropped; d += dropped;
        }
        int64_t g1 = g;
        while (g1 < ngrow && grow[g1] < base + in) ++g1;
        int64_t a = 0;
        while (a < na && g < g1) {  // merge by column: selects, no branch on the comparison
            const int64_t gc = grow[g] - base;
            const int take = kc[a] < gc;
            bad |= kc[a] == gc;
            new_col[w] = (I)(take ? kc[a] : gc);
            src[w] = take ? ks[a] : -1;
            ++w; a += take; g += !take;
        }
        for (; a < na; ++a, ++w) { new_col[w] = (I)kc[a]; src[w] = ks[a]; }
        for (; g < g1; ++g, ++w) { new_col[w] = (I)(grow[g] - base); src[w] = -1; }
        new_crow[i + 1] = (int32_t)w;
    }
    free(kc);
    free(ks);
    if (bad) return 1;
    if (d != ndrop) return 3;
    return 0;
}

extern "C" {
int sb_abi_version(void) { return 8; }
int64_t sb_select_gt(const float* s, int64_t n, float tau, int64_t* out, int64_t cap) {
    return select_gt_impl(s, n, tau, out, cap);
}
// a[w] = a[src[w]] (0 where src[w] < 0) for w < n, through tmp (n floats): values and optimizer state to
// the slots of a merged structure
void sb_remap(const int32_t* src, int64_t n, float* a, float* tmp) {
    for (int64_t w = 0; w < n; ++w) {  // selects, no branch on the 30% grown slots
        const int32_t j = src[w];
        const float v = a[j < 0 ? 0 : j];
        tmp[w] = j < 0 ? 0.0f : v;
    }
    memcpy(a, tmp, sizeof(float) * (size_t)n);
}
// removes from the c ascending positions idx (and their val) those in ex (nex ascending): one merge pass
// over both lists; returns the count kept
int64_t sb_drop_listed(int32_t* idx, float* val, int64_t c, const int64_t* ex, int64_t nex) {
    int64_t e = 0, w = 0;
    for (int64_t r = 0; r < c; ++r) {
        const int64_t q = idx[r];
        while (e < nex && ex[e] < q) ++e;
        const int keep = !(e < nex && ex[e] == q);
        idx[w] = idx[r]; val[w] = val[r];
        w += keep;
    }
    return w;
}
// absolute: |s| > tau (val = |s|), else s > tau. Positions base + i.
int64_t sb_select_vals(const float* s, int64_t n, float tau, int absolute, int64_t base, int32_t* idx, float* val,
                       int64_t cap, int nt) {
    if (base < 0 || base + n >= ((int64_t)1 << 31)) return -1;  // int32 positions
    const int32_t b = (int32_t)base;
    return absolute ? select_vals_impl<true>(s, n, tau, b, idx, val, cap, nt)
                    : select_vals_impl<false>(s, n, tau, b, idx, val, cap, nt);
}
// |s| + rb[r] * cb[j] > tau over a bf16 score block (select_bound_bf16_impl); positions base + r * n_in + j.
int64_t sb_select_bound_bf16(const uint16_t* s, int64_t rows, int64_t n_in, float tau, const float* rb, const float* cb,
                             int64_t base, int32_t* idx, int64_t cap, int nt) {
    if (base < 0 || base + rows * n_in >= ((int64_t)1 << 31)) return -1;  // int32 positions
    return select_bound_bf16_impl(s, rows, n_in, tau, rb, cb, (int32_t)base, idx, cap, nt);
}
#define EXPORT(SUF, I) \
void sb_spmm_##SUF(int64_t out, int64_t B, const int32_t* crow, const I* col, const float* val, const float* bias, \
                   const float* xT, int64_t ldx, float* yT, int64_t ldy, int chunk, int nt) { \
    spmm_impl<I>(out, B, crow, col, val, bias, xT, ldx, yT, ldy, chunk, nt); } \
void sb_bwd_##SUF(int64_t out, int64_t in, int64_t nnz, int64_t B, const int32_t* crow, const I* col, \
                  const float* val, const float* xT, int64_t ldx, const float* dyT, int64_t ldd, float* dxT, int64_t ldo, \
                  float* dv, int chunk, int nt) { \
    memset(dxT, 0, sizeof(float) * (size_t)(in * ldo)); \
    if (dv) bwd_impl<true, I>(out, nnz, B, crow, col, val, xT, ldx, dyT, ldd, dxT, ldo, dv, chunk, nt); \
    else bwd_impl<false, I>(out, nnz, B, crow, col, val, xT, ldx, dyT, ldd, dxT, ldo, dv, chunk, nt); } \
void sb_sddmm_##SUF(int64_t out, int64_t B, const int32_t* crow, const I* col, const float* xT, int64_t ldx, \
                    const float* dyT, int64_t ldd, float* dv, int chunk, int nt) { \
    sddmm_impl<I>(out, B, crow, col, xT, ldx, dyT, ldd, dv, chunk, nt); } \
void sb_transpose_##SUF(int64_t out, int64_t in, const int32_t* crow, const I* col, const float* val, int32_t* t_crow, \
                        int32_t* t_col, float* t_val) { transpose_impl<I>(out, in, crow, col, val, t_crow, t_col, t_val); } \
int sb_merge_##SUF(int64_t out, int64_t in, const int32_t* crow, const I* col, const int64_t* drop, int64_t ndrop, \
                   const int64_t* grow, int64_t ngrow, int32_t* new_crow, I* new_col, int32_t* src, int64_t cap) { \
    return merge_impl<I>(out, in, crow, col, drop, ndrop, grow, ngrow, new_crow, new_col, src, cap); }
EXPORT(i16, int16_t)
EXPORT(i32, int32_t)
}
