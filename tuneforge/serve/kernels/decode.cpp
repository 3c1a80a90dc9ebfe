// Fused CPU kernels for one decoding step of a llama-shaped decoder (see kernels/__init__.py for why and how they
// are built). Each kernel exists for float and for bfloat16 (stored as uint16_t); a bf16 kernel rounds where the
// torch operations it replaces round (round to nearest even, as c10::BFloat16), and computes in fp32 in between.
// Strides are in elements; the last dimension of every tensor is contiguous.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define TF_AVX512_BF16 1
#endif

namespace {

// Elementwise kernels spread their rows over the threads from this many elements on: a decoding step's [32, 576]
// norm too (measured, SmolLM2 bf16 on 2 cores, paired steps: ~3% faster a step than on the calling thread alone,
// with OpenMP's default wait policy; ~6% slower with OMP_WAIT_POLICY=PASSIVE, which model servers do not set).
constexpr int64_t kParallelElements = 1 << 12;
// Columns of keys / values the attention kernel prefetches ahead (a prefetch never faults: near a row's end it may
// name memory past the buffer, which only costs a wasted fetch).
constexpr int64_t kAhead = 16;

inline float bf16_to_float(uint16_t h) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16);
}

inline uint16_t float_to_bf16(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);  // NaN stays NaN
}

// The storage type T: load as float, store from float, and `round`: what a torch op producing a T tensor does to
// an fp32 result (nothing for float).
struct F32 {
    using T = float;
    static inline float load(T x) { return x; }
    static inline T store(float x) { return x; }
    static inline float round(float x) { return x; }
};

struct BF16 {
    using T = uint16_t;
    static inline float load(T x) { return bf16_to_float(x); }
    static inline T store(float x) { return float_to_bf16(x); }
    static inline float round(float x) { return bf16_to_float(float_to_bf16(x)); }
};

// exp(x) for x <= 0 (softmax after the maximum is taken off), vectorisable: 2^(x log2 e) split into an integer
// power (exponent bits) and a degree-6 polynomial of the fraction; relative error < 2e-7 on [-87, 0]. Computed
// on 16 lanes with GCC vector extensions (lowered to whatever SIMD the CPU has): a scalar form is not
// vectorised by GCC (its floor and clamps keep control flow under IEEE trapping rules).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

inline v16f vexp_nonpositive(v16f x) {
    const v16f lo = v16f{} - 87.0f;
    x = x < lo ? lo : x;
    v16f t = x * 1.44269504088896341f;
    v16i ni = __builtin_convertvector(t, v16i);  // towards zero
    v16f n = __builtin_convertvector(ni, v16f);
    v16i below = n > t;  // -1 where truncation went up: floor is one less
    ni += below;
    n = __builtin_convertvector(ni, v16f);
    v16f f = t - n;
    v16f p = v16f{} + 1.5353362e-4f;
    p = p * f + 1.3398874e-3f;
    p = p * f + 9.6184490e-3f;
    p = p * f + 5.5503334e-2f;
    p = p * f + 2.4022650e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    return (v16f)((v16i)p + (ni << 23));
}

// The scalar form (loop tails), through the same lanes: scalar and vector loops give identical results.
inline float exp_nonpositive(float x) { return vexp_nonpositive(v16f{} + x)[0]; }

inline v16f load16(const float* p) {
    v16f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline v16f load16(const uint16_t* p) {
    v16h h;
    std::memcpy(&h, p, sizeof h);
    return (v16f)(__builtin_convertvector(h, v16u) << 16);
}
inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }
inline void store16(uint16_t* p, v16f v) {
    v16u u = (v16u)v;
    v16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    v16u nan = (u & 0x7fffffffu) > 0x7f800000u;
    rounded = nan ? v16u{} + 0x7fc0u : rounded;
    v16h h = __builtin_convertvector(rounded, v16h);
    std::memcpy(p, &h, sizeof h);
}
template <class K>
inline v16f round16(v16f v) {
    if constexpr (std::is_same_v<typename K::T, float>) {
        return v;
    } else {
        uint16_t tmp[16];
        store16(tmp, v);
        return load16(tmp);
    }
}

// Each of `group` rows of scores [group, width] replaced by its softmax, in place (fp32).
inline void softmax_rows(float* scores, int64_t group, int64_t width) {
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * width;
        float mx = sg[0];
        for (int64_t j = 1; j < width; ++j) mx = sg[j] > mx ? sg[j] : mx;
        float sum = 0.0f;
        int64_t j = 0;
        for (; j + 16 <= width; j += 16) {
            v16f e = vexp_nonpositive(load16(sg + j) - mx);
            store16(sg + j, e);
            for (int l = 0; l < 16; ++l) sum += e[l];
        }
        for (; j < width; ++j) {
            float e = exp_nonpositive(sg[j] - mx);
            sg[j] = e;
            sum += e;
        }
        const float inv = 1.0f / sum;
        for (j = 0; j < width; ++j) sg[j] *= inv;
    }
}

// x[r] += add[r] (when add is given, rounded as a tensor add), then out[r] = weight * (x[r] / rms(x[r])) as
// transformers' LlamaRMSNorm: the normalised row rounded to T, then multiplied by the weight and rounded again.
template <class K>
void rms_norm(typename K::T* x, int64_t sx, const typename K::T* add, int64_t sa, const typename K::T* w,
              typename K::T* out, int64_t so, int64_t rows, int64_t n, float eps, int threads) {
    using T = typename K::T;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        T* xr = x + r * sx;
        if (add != nullptr) {
            const T* ar = add + r * sa;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) xr[i] = K::store(K::load(xr[i]) + K::load(ar[i]));
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; ++i) {
            float v = K::load(xr[i]);
            ss += v * v;
        }
        float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
        T* orow = out + r * so;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) orow[i] = K::store(K::load(w[i]) * K::round(K::load(xr[i]) * inv));
    }
}

// Rotary embedding of q and k (transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, each product
// rounded to T, then the sum), q written to q_out [rows, heads, d]; k and v written into column `col` of the
// cache buffers [rows, kv_heads, capacity, d] (strides s_row, s_head; a column is d elements).
template <class K>
void rotary_append(const typename K::T* q, int64_t sq, const typename K::T* k, int64_t sk, const typename K::T* v,
                   int64_t sv, const typename K::T* cos, const typename K::T* sin, typename K::T* q_out,
                   typename K::T* kbuf, typename K::T* vbuf, int64_t s_row, int64_t s_head, int64_t col, int64_t rows,
                   int64_t heads, int64_t kv_heads, int64_t d, int threads) {
    using T = typename K::T;
    const int64_t half = d / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * (heads + 2 * kv_heads) * d >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const T* c = cos + r * d;
        const T* s = sin + r * d;
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
            const bool is_q = h < heads;
            const T* src = is_q ? q + r * sq + h * d : k + r * sk + (h - heads) * d;
            T* dst = is_q ? q_out + (r * heads + h) * d : kbuf + r * s_row + (h - heads) * s_head + col * d;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                float a = K::round(K::load(src[i]) * K::load(c[i]));
                float b = K::round(-K::load(src[i + half]) * K::load(s[i]));
                dst[i] = K::store(a + b);
            }
#pragma omp simd
            for (int64_t i = half; i < d; ++i) {
                float a = K::round(K::load(src[i]) * K::load(c[i]));
                float b = K::round(K::load(src[i - half]) * K::load(s[i]));
                dst[i] = K::store(a + b);
            }
        }
        for (int64_t h = 0; h < kv_heads; ++h) {
            const T* src = v + r * sv + h * d;
            T* dst = vbuf + r * s_row + h * s_head + col * d;
            std::memcpy(dst, src, sizeof(T) * d);
        }
    }
}

#ifdef TF_AVX512_BF16
// One (row, key/value head) of `attend` in bf16 with AVX512-BF16: q.k as bf16 pair dot products accumulated in fp32
// (vdpbf16ps: the products are exact, as in an fp32 dot of the same bf16 values), the weighted sum of values in
// fp32 FMAs. d is a multiple of 32.
inline void attend_task_avx512(const uint16_t* qh, const uint16_t* kh, const uint16_t* vh, int64_t width, int64_t d,
                               int64_t group, float scale, float* scores, float* acc, uint16_t* out_h) {
    for (int64_t j = 0; j < width; ++j) {
        const uint16_t* kj = kh + j * d;
        for (int64_t g = 0; g < group; ++g) {
            const uint16_t* qg = qh + g * d;
            __m512 a = _mm512_setzero_ps();
            for (int64_t i = 0; i < d; i += 32)
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qg + i), (__m512bh)_mm512_loadu_si512(kj + i));
            scores[g * width + j] = _mm512_reduce_add_ps(a) * scale;
        }
    }
    softmax_rows(scores, group, width);
    for (int64_t x = 0; x < group * d; x += 16) _mm512_storeu_ps(acc + x, _mm512_setzero_ps());
    for (int64_t j = 0; j < width; ++j) {
        const uint16_t* vj = vh + j * d;
        for (int64_t c = 0; c < d; c += 16) {
            __m512 v = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vj + c)));
            for (int64_t g = 0; g < group; ++g) {
                float* ag = acc + g * d + c;
                _mm512_storeu_ps(ag, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * width + j]), v, _mm512_loadu_ps(ag)));
            }
        }
    }
    for (int64_t g = 0; g < group; ++g)
        for (int64_t c = 0; c < d; c += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_h + g * d + c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc + g * d + c)));
}

// The sums of four vectors' lanes, as one [4] vector (cheaper than four separate horizontal reductions).
inline __m128 reduce4(const __m512* a) {
    __m256 b[4];
    for (int u = 0; u < 4; ++u)
        b[u] = _mm256_add_ps(_mm512_castps512_ps256(a[u]), _mm512_extractf32x8_ps(a[u], 1));
    __m256 c = _mm256_hadd_ps(_mm256_hadd_ps(b[0], b[1]), _mm256_hadd_ps(b[2], b[3]));
    return _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}

// The same with the head size and the group known at compile time (the common shapes): queries, accumulators and
// the current value row stay in registers.
template <int D, int G>
void attend_task_avx512_fixed(const uint16_t* qh, const uint16_t* kh, const uint16_t* vh, int64_t width, float scale,
                              float* scores, uint16_t* out_h) {
    constexpr int C = D / 32, V = D / 16;
    __m512bh qv[G][C];
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) qv[g][c] = (__m512bh)_mm512_loadu_si512(qh + g * D + c * 32);
    int64_t j = 0;
    for (; j + 4 <= width; j += 4) {  // four columns at a time: their four sums reduced together
        const char* ahead = reinterpret_cast<const char*>(kh + (j + kAhead) * D);
        for (int u = 0; u < 4 * D * 2; u += 64) __builtin_prefetch(ahead + u);
        __m512bh kv[4][C];
        for (int u = 0; u < 4; ++u)
            for (int c = 0; c < C; ++c) kv[u][c] = (__m512bh)_mm512_loadu_si512(kh + (j + u) * D + c * 32);
        for (int g = 0; g < G; ++g) {
            __m512 a[4];
            for (int u = 0; u < 4; ++u) {
                a[u] = _mm512_setzero_ps();
                for (int c = 0; c < C; ++c) a[u] = _mm512_dpbf16_ps(a[u], qv[g][c], kv[u][c]);
            }
            _mm_storeu_ps(scores + g * width + j, _mm_mul_ps(reduce4(a), _mm_set1_ps(scale)));
        }
    }
    for (; j < width; ++j) {
        const uint16_t* kj = kh + j * D;
        __m512bh kv[C];
        for (int c = 0; c < C; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(kj + c * 32);
        for (int g = 0; g < G; ++g) {
            __m512 a = _mm512_setzero_ps();
            for (int c = 0; c < C; ++c) a = _mm512_dpbf16_ps(a, qv[g][c], kv[c]);
            scores[g * width + j] = _mm512_reduce_add_ps(a) * scale;
        }
    }
    softmax_rows(scores, G, width);
    __m512 acc[G][V];
    for (int g = 0; g < G; ++g)
        for (int v = 0; v < V; ++v) acc[g][v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; ++j) {
        const uint16_t* vj = vh + j * D;
        const char* ahead = reinterpret_cast<const char*>(vj + kAhead * D);
        for (int u = 0; u < D * 2; u += 64) __builtin_prefetch(ahead + u);
        __m512 vf[V];
        for (int v = 0; v < V; ++v)
            vf[v] = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vj + v * 16)));
        for (int g = 0; g < G; ++g) {
            const __m512 p = _mm512_set1_ps(scores[g * width + j]);
            for (int v = 0; v < V; ++v) acc[g][v] = _mm512_fmadd_ps(p, vf[v], acc[g][v]);
        }
    }
    for (int g = 0; g < G; ++g)
        for (int v = 0; v < V; ++v)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_h + g * D + v * 16),
                                (__m256i)_mm512_cvtneps_pbh(acc[g][v]));
}

// Runs the fixed-shape task where (d, group) is one of the compiled shapes; false otherwise.
template <int D>
bool attend_task_fixed_d(int64_t group, const uint16_t* qh, const uint16_t* kh, const uint16_t* vh, int64_t width,
                         float scale, float* scores, uint16_t* out_h) {
    switch (group) {
        case 1: attend_task_avx512_fixed<D, 1>(qh, kh, vh, width, scale, scores, out_h); return true;
        case 2: attend_task_avx512_fixed<D, 2>(qh, kh, vh, width, scale, scores, out_h); return true;
        case 3: attend_task_avx512_fixed<D, 3>(qh, kh, vh, width, scale, scores, out_h); return true;
        case 4: attend_task_avx512_fixed<D, 4>(qh, kh, vh, width, scale, scores, out_h); return true;
        case 5: attend_task_avx512_fixed<D, 5>(qh, kh, vh, width, scale, scores, out_h); return true;
        case 6: attend_task_avx512_fixed<D, 6>(qh, kh, vh, width, scale, scores, out_h); return true;
        case 7: attend_task_avx512_fixed<D, 7>(qh, kh, vh, width, scale, scores, out_h); return true;
        case 8: attend_task_avx512_fixed<D, 8>(qh, kh, vh, width, scale, scores, out_h); return true;
        default: return false;
    }
}

inline bool attend_task_fixed(int64_t d, int64_t group, const uint16_t* qh, const uint16_t* kh, const uint16_t* vh,
                              int64_t width, float scale, float* scores, uint16_t* out_h) {
    if (d == 64) return attend_task_fixed_d<64>(group, qh, kh, vh, width, scale, scores, out_h);
    if (d == 128) return attend_task_fixed_d<128>(group, qh, kh, vh, width, scale, scores, out_h);
    return false;
}
#endif

// One new query token per row against its cache: row r attends to columns [start[r], end) of its buffers (the
// columns before start[r] are its left padding). The query heads of one key/value head share each key and value
// read. Scores, softmax and the weighted sum in fp32; out [rows, heads * d] rounded to T. Rows x kv heads are
// spread over `threads` OpenMP threads (the same runtime as torch's).
template <class K>
void attend(const typename K::T* q, const typename K::T* kbuf, const typename K::T* vbuf, int64_t s_row,
            int64_t s_head, const int64_t* start, int64_t end, typename K::T* out, int64_t rows, int64_t heads,
            int64_t kv_heads, int64_t d, float scale, int threads) {
    using T = typename K::T;
    const int64_t group = heads / kv_heads;
    const int64_t tasks = rows * kv_heads;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> scores, qf, acc, row;
#pragma omp for schedule(dynamic, 4)  // rows' widths differ: static halves would not balance
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t r = task / kv_heads, h = task % kv_heads;
            const int64_t first = start[r] < 0 ? 0 : start[r];
            const int64_t width = end - first;
            if (width <= 0) continue;
#ifdef TF_AVX512_BF16
            if constexpr (std::is_same_v<T, uint16_t>) {
                if (d % 32 == 0) {
                    scores.resize(static_cast<size_t>(group * width));
                    const uint16_t* qh = q + (r * heads + h * group) * d;
                    const uint16_t* kh = kbuf + r * s_row + h * s_head + first * d;
                    const uint16_t* vh = vbuf + r * s_row + h * s_head + first * d;
                    uint16_t* oh = out + r * heads * d + h * group * d;
                    if (attend_task_fixed(d, group, qh, kh, vh, width, scale, scores.data(), oh)) continue;
                    acc.resize(static_cast<size_t>(group * d));
                    attend_task_avx512(q + (r * heads + h * group) * d, kbuf + r * s_row + h * s_head + first * d,
                                       vbuf + r * s_row + h * s_head + first * d, width, d, group, scale,
                                       scores.data(), acc.data(), out + r * heads * d + h * group * d);
                    continue;
                }
            }
#endif
            scores.resize(static_cast<size_t>(group * width));
            qf.resize(static_cast<size_t>(group * d));
            acc.assign(static_cast<size_t>(group * d), 0.0f);
            row.resize(static_cast<size_t>(d));
            for (int64_t g = 0; g < group; ++g) {
                const T* qg = q + (r * heads + h * group + g) * d;
                for (int64_t i = 0; i < d; ++i) qf[g * d + i] = K::load(qg[i]) * scale;
            }
            const T* kh = kbuf + r * s_row + h * s_head + first * d;
            const T* vh = vbuf + r * s_row + h * s_head + first * d;
            for (int64_t j = 0; j < width; ++j) {
                const T* kj = kh + j * d;
                float* kr = row.data();
#pragma omp simd
                for (int64_t i = 0; i < d; ++i) kr[i] = K::load(kj[i]);
                for (int64_t g = 0; g < group; ++g) {
                    const float* qq = qf.data() + g * d;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < d; ++i) dot = std::fma(qq[i], kr[i], dot);
                    scores[g * width + j] = dot;
                }
            }
            softmax_rows(scores.data(), group, width);
            for (int64_t j = 0; j < width; ++j) {
                const T* vj = vh + j * d;
                float* vr = row.data();
#pragma omp simd
                for (int64_t i = 0; i < d; ++i) vr[i] = K::load(vj[i]);
                for (int64_t g = 0; g < group; ++g) {
                    const float p = scores[g * width + j];
                    float* ag = acc.data() + g * d;
#pragma omp simd
                    for (int64_t i = 0; i < d; ++i) ag[i] = std::fma(p, vr[i], ag[i]);
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                T* og = out + r * heads * d + (h * group + g) * d;
                for (int64_t i = 0; i < d; ++i) og[i] = K::store(acc[g * d + i]);
            }
        }
    }
}

// out = silu(gate) * up, each rounded to T as torch's act_fn(gate) * up.
template <class K>
void silu_mul(const typename K::T* gate, int64_t sg, const typename K::T* up, int64_t su, typename K::T* out,
              int64_t rows, int64_t n, int threads) {
    using T = typename K::T;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gate + r * sg;
        const T* u = up + r * su;
        T* o = out + r * n;
int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            v16f x = load16(g + i);
            v16f ax = x < 0.0f ? -x : x;
            v16f e = vexp_nonpositive(-ax);  // x / (1 + exp(-x)) without an overflowing exp
            v16f num = x >= 0.0f ? v16f{} + 1.0f : e;
            v16f act = round16<K>(x * (num / (1.0f + e)));
            store16(o + i, act * load16(u + i));
        }
        for (; i < n; ++i) {
            float x = K::load(g[i]);
            float e = exp_nonpositive(-std::fabs(x));
            float act = K::round(x * ((x >= 0.0f ? 1.0f : e) / (1.0f + e)));
            o[i] = K::store(act * K::load(u[i]));
        }
    }
}

// y[row] += (x[row] A_s^T) B_s^T for each row's adapter slot s = slots[row] (slot 0: the base model, skipped), in
// place: a [S * r, in] holds every slot's A (slot-major), bt [S * r, out] every slot's scaled B^T (as
// `MultiLoraLinear.stacks`). Each row reads only its own slot's r x (in + out) weights (a gathered matrix-vector
// product, as Punica's BGMV): the low-rank term of a mixed batch costs what one adapter's does. fp32 in between; y
// rounded once.
template <class K>
void lora_rows(const typename K::T* x, int64_t sx, typename K::T* y, int64_t sy, const typename K::T* a,
               const typename K::T* bt, const int64_t* slots, int64_t rows, int64_t r, int64_t in, int64_t out,
               int threads) {
    using T = typename K::T;
#pragma omp parallel num_threads(threads) if (rows * r * (in + out) >= 8 * kParallelElements)
    {
        std::vector<float> xf(static_cast<size_t>(in)), h(static_cast<size_t>(r));
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            const int64_t s = slots[row];
            if (s <= 0) continue;
            const T* xr = x + row * sx;
            int64_t i = 0;
            for (; i + 16 <= in; i += 16) store16(xf.data() + i, load16(xr + i));
            for (; i < in; ++i) xf[i] = K::load(xr[i]);
            for (int64_t k = 0; k < r; ++k) {
                const T* ak = a + (s * r + k) * in;
                v16f acc = v16f{};
                float tail = 0.0f;
                for (i = 0; i + 16 <= in; i += 16) acc += load16(xf.data() + i) * load16(ak + i);
                for (; i < in; ++i) tail += xf[i] * K::load(ak[i]);
                float dot = tail;
                for (int l = 0; l < 16; ++l) dot += acc[l];
                h[k] = dot;
            }
            T* yr = y + row * sy;
            const T* bs = bt + s * r * out;
            int64_t j = 0;
            for (; j + 16 <= out; j += 16) {
                v16f v = v16f{};
                for (int64_t k = 0; k < r; ++k) v += h[k] * load16(bs + k * out + j);
                store16(yr + j, load16(yr + j) + v);
            }
            for (; j < out; ++j) {
                float v = 0.0f;
                for (int64_t k = 0; k < r; ++k) v += h[k] * K::load(bs[k * out + j]);
                yr[j] = K::store(K::load(yr[j]) + v);
            }
        }
    }
}

// Per row of logits [rows, n]: the first index of the maximum, the maximum, and log(sum(exp(x))) (fp32), for
// greedy rows: the token, and its log-probability = maximum - logsumexp, in two passes over the row.
template <class K>
void argmax_logsumexp(const typename K::T* logits, int64_t stride, int64_t rows, int64_t n, int64_t* index,
                      float* maximum, float* lse, int threads) {
    using T = typename K::T;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const T* x = logits + r * stride;
        int64_t i = 0;
        v16f mv = v16f{} - INFINITY;
        for (; i + 16 <= n; i += 16) {
            v16f v = load16(x + i);
            mv = v > mv ? v : mv;
        }
        float mx = -INFINITY;
        for (int l = 0; l < 16; ++l) mx = mv[l] > mx ? mv[l] : mx;
        for (; i < n; ++i) mx = K::load(x[i]) > mx ? K::load(x[i]) : mx;
        int64_t at = 0;
        while (at < n && !(K::load(x[at]) == mx)) ++at;  // NaN rows: no index equals, `at` stays n -> 0 below
        float sum = 0.0f;
        if (std::isfinite(mx)) {
            v16f sv = v16f{};
            for (i = 0; i + 16 <= n; i += 16) sv += vexp_nonpositive(load16(x + i) - mx);
            for (int l = 0; l < 16; ++l) sum += sv[l];
            for (; i < n; ++i) sum += exp_nonpositive(K::load(x[i]) - mx);
        }
        index[r] = at < n ? at : 0;
        maximum[r] = mx;
        lse[r] = std::isfinite(mx) ? mx + std::log(sum) : mx;
    }
}

}  // namespace

#define TF_EXPORT(suffix, KIND)                                                                                      \
    extern "C" void tf_rms_norm_##suffix(void* x, int64_t sx, const void* add, int64_t sa, const void* w, void* out, \
                                         int64_t so, int64_t rows, int64_t n, float eps, int threads) {              \
        using T = KIND::T;                                                                                           \
        rms_norm<KIND>(static_cast<T*>(x), sx, static_cast<const T*>(add), sa, static_cast<const T*>(w),            \
                       static_cast<T*>(out), so, rows, n, eps, threads);                                                      \
    }                                                                                                                \
    extern "C" void tf_rotary_append_##suffix(const void* q, int64_t sq, const void* k, int64_t sk, const void* v,   \
                                              int64_t sv, const void* cos, const void* sin, void* q_out, void* kbuf, \
                                              void* vbuf, int64_t s_row, int64_t s_head, int64_t col, int64_t rows,  \
                                              int64_t heads, int64_t kv_heads, int64_t d, int threads) {             \
        using T = KIND::T;                                                                                           \
        rotary_append<KIND>(static_cast<const T*>(q), sq, static_cast<const T*>(k), sk, static_cast<const T*>(v),   \
                            sv, static_cast<const T*>(cos), static_cast<const T*>(sin), static_cast<T*>(q_out),      \
                            static_cast<T*>(kbuf), static_cast<T*>(vbuf), s_row, s_head, col, rows, heads, kv_heads, \
                            d, threads);                                                                                      \
    }                                                                                                                \
    extern "C" void tf_attend_##suffix(const void* q, const void* kbuf, const void* vbuf, int64_t s_row,             \
                                       int64_t s_head, const int64_t* start, int64_t end, void* out, int64_t rows,   \
                                       int64_t heads, int64_t kv_heads, int64_t d, float scale, int threads) {       \
        using T = KIND::T;                                                                                           \
        attend<KIND>(static_cast<const T*>(q), static_cast<const T*>(kbuf), static_cast<const T*>(vbuf), s_row,     \
                     s_head, start, end, static_cast<T*>(out), rows, heads, kv_heads, d, scale, threads);            \
    }                                                                                                                \
    extern "C" void tf_silu_mul_##suffix(const void* gate, int64_t sg, const void* up, int64_t su, void* out,       \
                                         int64_t rows, int64_t n, int threads) {                                     \
        using T = KIND::T;                                                                                           \
        silu_mul<KIND>(static_cast<const T*>(gate), sg, static_cast<const T*>(up), su, static_cast<T*>(out), rows,  \
                       n, threads);                                                                                           \
    }

#define TF_EXPORT_SAMPLING(suffix, KIND)                                                                             \
    extern "C" void tf_argmax_logsumexp_##suffix(const void* logits, int64_t stride, int64_t rows, int64_t n,        \
                                                 int64_t* index, float* maximum, float* lse, int threads) {          \
        argmax_logsumexp<KIND>(static_cast<const KIND::T*>(logits), stride, rows, n, index, maximum, lse, threads);  \
    }

#define TF_EXPORT_LORA(suffix, KIND)                                                                                 \
    extern "C" void tf_lora_rows_##suffix(const void* x, int64_t sx, void* y, int64_t sy, const void* a,             \
                                          const void* bt, const int64_t* slots, int64_t rows, int64_t r, int64_t in, \
                                          int64_t out, int threads) {                                                \
        using T = KIND::T;                                                                                           \
        lora_rows<KIND>(static_cast<const T*>(x), sx, static_cast<T*>(y), sy, static_cast<const T*>(a),             \
                        static_cast<const T*>(bt), slots, rows, r, in, out, threads);                                \
    }

TF_EXPORT_LORA(f32, F32)
TF_EXPORT_LORA(bf16, BF16)
TF_EXPORT_SAMPLING(f32, F32)
TF_EXPORT_SAMPLING(bf16, BF16)
TF_EXPORT(f32, F32)
TF_EXPORT(bf16, BF16)
