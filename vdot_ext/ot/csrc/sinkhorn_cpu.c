/* One fused log-domain Sinkhorn iteration (f then g) for ½‖a − b‖² costs on CPU.
 *
 * Built at first use by vdot_ext/ot/cpu_kernel.py (gcc/clang, -O3 -march=native -fopenmp)
 * and called through ctypes; plain C with GCC vector extensions, no library but libm/OpenMP.
 *
 * Notation (vdot_ext/ot/sinkhorn.py): centred clouds a'_i, b'_j ∈ R^D, scores
 *     S_ij = a'_i·b'_j / ε + h_j,      h_j = log μ_j + (g_j − ½‖b'_j‖²)/ε   (current g)
 * The f half-step is the row log-sum-exp
 *     L_i = LSE_j S_ij = m_i + log Z_i,   m_i = max_j S_ij,  Z_i = Σ_j E_ij,  E_ij = exp(S_ij − m_i)
 *     f_i = ½‖a'_i‖² − ε L_i                                          (done by the caller)
 * and the g half-step that follows needs, for the (possibly over-relaxed) new f,
 *     c_i = log u_i + (f_i − ½‖a'_i‖²)/ε = log u_i + (1 − ω) q_i − ω L_i,  q_i = (f_old_i − ½‖a'_i‖²)/ε
 *     LSE_i (a'_i·b'_j/ε + c_i) = log M_j − h_j,   M_j = Σ_i exp(S_ij + c_i) = Σ_i w_i E_ij,
 *     w_i = exp(c_i + m_i)
 * M_j is the column mass of the plan T_ij = exp(c_i + S_ij), so g_j ← g_j + ε (log μ_j − log M_j)
 * (the caller; Cuturi 2013 scaling form, here derived from the log-domain update).
 *
 * Why fused: the plain log-domain iteration forms the I×J Gram product twice (once per
 * half-step) and exponentiates every score twice. Here one row block of S is formed once
 * (R rows × all J, kept in L2), exponentiated once, and serves both half-steps: the column
 * masses are a weighted column sum of the E already computed for the row log-sum-exp.
 * For ω = 1 w_i = u_i / Z_i ∈ [u_i / J, u_i], so E_ij w_i = T_ij stays in float range
 * whenever the column mass is not astronomically small; the caller checks M_j and redoes
 * the g half-step exactly in the log domain when any M_j < MIN_MASS or is not finite.
 *
 * Exponentials: Cephes expf polynomial (S. Moshier), vectorised; arguments clamped at
 * EXP_LO so that 2^n stays a normal float. Denormals are flushed (FTZ/DAZ) inside the
 * kernel only: entries below 1e-38 are negligible against Z_i ≥ 1 and M_j ≥ MIN_MASS.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16
#define R 8        /* rows per micro-tile */
#define NV 3       /* vectors (of VL columns) per micro-tile: R·NV accumulators */
#elif defined(__AVX__)
#define VL 8
#define R 6
#define NV 2
#else
#define VL 4
#define R 4
#define NV 2
#endif
#define TILE (NV * VL)

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef float vf_u __attribute__((vector_size(VL * 4), aligned(4), may_alias));

#define EXP_LO (-87.0f)

static inline vf vset(float x) { return (vf){0} + x; }
static inline vf vload(const float *p) { return *(const vf_u *)p; }
static inline void vstore(float *p, vf v) { *(vf_u *)p = v; }
static inline vf vmax(vf a, vf b) {
    vi m = a > b;
    return (vf)((m & (vi)a) | (~m & (vi)b));
}
static inline float hmax(vf v) {
    float m = v[0];
    for (int k = 1; k < VL; ++k) m = v[k] > m ? v[k] : m;
    return m;
}
static inline double hsum(vf v) {
    double s = 0.0;
    for (int k = 0; k < VL; ++k) s += v[k];
    return s;
}

/* exp(x) for x ≤ 0 (Cephes expf: x = n ln2 + r, |r| ≤ ln2/2, degree-6 polynomial, × 2^n). */
static inline vf vexp(vf x) {
    x = vmax(x, vset(EXP_LO));
    /* n = round(x log2 e) by the 1.5·2^23 trick (round-to-nearest mode, |x log2 e| < 2^22) */
    const vf magic = vset(12582912.0f);
    vf n = (x * vset(1.44269504088896341f) + magic) - magic;
    vf r = x - n * vset(0.693359375f);
    r = r - n * vset(-2.12194440e-4f);
    vf z = r * r;
    vf y = vset(1.9875691500e-4f);
    y = y * r + vset(1.3981999507e-3f);
    y = y * r + vset(8.3334519073e-3f);
    y = y * r + vset(4.1665795894e-2f);
    y = y * r + vset(1.6666665459e-1f);
    y = y * r + vset(5.0000001201e-1f);
    y = y * z + r + vset(1.0f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;    /* 2^n, n ≥ −126 */
    return y * (vf)e;
}

/* S[r][j] = (a_r·b_j)/ε + h_j for R rows and all Jp columns; returns the row maxima. */
static void score_rows(const float *A, const float *Bt, const float *h, int D, long Jp,
                       float inv_eps, float *S, float *row_max) {
    vf mx[R];
    for (int r = 0; r < R; ++r) mx[r] = vset(-INFINITY);
    const vf ie = vset(inv_eps);
    for (long j0 = 0; j0 < Jp; j0 += TILE) {
        vf acc[R][NV];
        for (int r = 0; r < R; ++r)
            for (int v = 0; v < NV; ++v) acc[r][v] = vset(0.0f);
        for (int d = 0; d < D; ++d) {
            const float *brow = Bt + (long)d * Jp + j0;
            vf b[NV];
            for (int v = 0; v < NV; ++v) b[v] = vload(brow + v * VL);
            for (int r = 0; r < R; ++r) {
                vf a = vset(A[r * D + d]);
                for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
            }
        }
        for (int v = 0; v < NV; ++v) {
            vf hv = vload(h + j0 + v * VL);
            for (int r = 0; r < R; ++r) {
                vf s = acc[r][v] * ie + hv;
                vstore(S + r * Jp + j0 + v * VL, s);
                mx[r] = vmax(mx[r], s);
            }
        }
    }
    for (int r = 0; r < R; ++r) row_max[r] = hmax(mx[r]);
}

/*
 * A:      [P, Ip, D]  centred a', rows padded with zeros to Ip (multiple of sinkhorn_cpu_rows())
 * Bt:     [P, D, Jp]  centred b' transposed, columns padded with zeros to Jp (multiple of TILE)
 * h:      [P, Jp]     row-pass bias; padded entries must be very negative (e.g. −1e30)
 * log_u:  [P, I]      log source weights
 * q:      [P, I]      (f_old − ½‖a'‖²)/ε, read only where omega[p] != 1 (may be NULL if all are 1)
 * omega:  [P]         over-relaxation of the f half-step
 * lse:    [P, I]      out: row log-sum-exp L_i
 * mass:   [P, J]      out: column masses M_j (float64)
 */
int sinkhorn_cpu_fg(const float *A, const float *Bt, const float *h, const float *log_u,
                    const float *q, const double *omega, long P, long I, long Ip, long J, long Jp,
                    int D, float inv_eps, int num_threads, float *lse, double *mass) {
    if (Ip % R != 0 || Jp % TILE != 0 || Ip < I || Jp < J) return 1;
    const long chunk = 12 * R;                       /* rows per work item */
    const long chunks = (Ip + chunk - 1) / chunk;
    const long items = P * chunks;
    /* no more threads than work items: each thread holds a P×J float64 partial sum */
    if (num_threads > items) num_threads = (int)items;
    if (num_threads < 1) num_threads = 1;
    double *part = calloc((size_t)num_threads * P * J, sizeof(double));
    if (!part) return 2;
    int status = 0;

#pragma omp parallel num_threads(num_threads)
    {
#if defined(__SSE__)
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);                    /* FTZ | DAZ, this thread, restored below */
#endif
#ifdef _OPENMP
        const int t = omp_get_thread_num();
#else
        const int t = 0;
#endif
        float *S = aligned_alloc(64, ((size_t)R * Jp * sizeof(float) + 63) / 64 * 64);
        float *col = aligned_alloc(64, ((size_t)Jp * sizeof(float) + 63) / 64 * 64);
        if (!S || !col) {
#pragma omp atomic write
            status = 2;
        }
#pragma omp for schedule(dynamic, 1)
        for (long it = 0; it < items; ++it) {
            if (status) continue;
            const long p = it / chunks;
            const long i_begin = (it % chunks) * chunk;
            const long i_end = i_begin + chunk < Ip ? i_begin + chunk : Ip;
            const float *Bp = Bt + p * (long)D * Jp;
            const float *hp = h + p * Jp;
            const double om = omega[p];
            memset(col, 0, (size_t)Jp * sizeof(float));
            for (long i0 = i_begin; i0 < i_end && i0 < I; i0 += R) {
                float m[R];
                score_rows(A + (p * Ip + i0) * D, Bp, hp, D, Jp, inv_eps, S, m);
                vf w[R];
                for (int r = 0; r < R; ++r) {
                    const long i = i0 + r;
                    if (i >= I) { w[r] = vset(0.0f); continue; }       /* padded row */
                    float *Sr = S + r * Jp;
                    const vf mv = vset(m[r]);
                    vf z = vset(0.0f);
                    for (long j = 0; j < Jp; j += VL) {
                        vf e = vexp(vload(Sr + j) - mv);
                        vstore(Sr + j, e);
                        z += e;
                    }
                    const double Z = hsum(z);
                    const double L = (double)m[r] + log(Z);
                    lse[p * I + i] = (float)L;
                    double c = log_u[p * I + i];
                    c += (om == 1.0 || !q) ? -L : (1.0 - om) * q[p * I + i] - om * L;
                    w[r] = vset((float)exp(c + m[r]));
                }
                for (long j = 0; j < Jp; j += VL) {
                    vf acc = vload(col + j);
                    for (int r = 0; r < R; ++r) acc += w[r] * vload(S + r * Jp + j);
                    vstore(col + j, acc);
                }
            }
            double *dst = part + ((long)t * P + p) * J;
            for (long j = 0; j < J; ++j) dst[j] += col[j];
        }
        free(S);
        free(col);
#if defined(__SSE__)
        _mm_setcsr(csr);
#endif
    }
    if (!status) {
        for (long k = 0; k < P * J; ++k) {
            double s = 0.0;
            for (int t = 0; t < num_threads; ++t) s += part[(long)t * P * J + k];
            mass[k] = s;
        }
    }
    free(part);
    return status;
}

int sinkhorn_cpu_rows(void) { return R; }
int sinkhorn_cpu_cols(void) { return TILE; }
