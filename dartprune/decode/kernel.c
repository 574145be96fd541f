/* A forward of T <= MAX_TOKENS tokens (a decode step, or a short teacher-forced chunk) of a Llama- or
 * Gemma-family decoder for a batch of one, weights read in place: float32, or bfloat16 when built with
 * -DWEIGHT_BF16 (each weight widened to float32 as it is loaded, which is exact; activations, sums, the KV cache
 * and the logits are float32 either way, so a bfloat16 model reads half the bytes and computes what the float32
 * build computes on the same weights upcast).
 *
 * Built by dartprune/decode/kernel.py with the system C compiler (gcc or clang, OpenMP) and loaded with ctypes.
 * The whole forward runs in one OpenMP parallel region: matrix products split their weight rows over the threads
 * (each row is read once and applied to all T tokens), attention splits its heads, and the small vector work
 * (norms, rotary, residual adds) runs on one thread between barriers. Every weight matrix is read once per
 * forward at the speed of memory, which is what a decode step is bound by; a pruned FFN reads only the first
 * `keep` neurons of its (permuted) weights.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <omp.h>

#define MAX_TOKENS 16

/* 8-float vectors (GCC/Clang vector extensions): one AVX register where the CPU has AVX, two SSE ones otherwise */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }

#ifdef WEIGHT_BF16
typedef unsigned short wt;                                  /* bfloat16: the high half of a float32 */
typedef unsigned short u16x8 __attribute__((vector_size(16)));
typedef unsigned int u32x8 __attribute__((vector_size(32)));

static inline float wf(wt w) { unsigned int b = (unsigned int)w << 16; float f; memcpy(&f, &b, sizeof f); return f; }

static inline v8 loadw8(const wt *p) {
    u16x8 h; memcpy(&h, p, sizeof h);
    u32x8 b = __builtin_convertvector(h, u32x8) << 16;
    v8 f; memcpy(&f, &b, sizeof f); return f;
}
#else
typedef float wt;

static inline float wf(wt w) { return w; }

static inline v8 loadw8(const wt *p) { return load8(p); }
#endif

typedef struct {
    const wt *input_norm, *q, *k, *v, *o, *q_bias, *k_bias, *v_bias, *o_bias;
    const wt *q_norm, *k_norm, *post_attention_norm, *ffn_norm, *post_ffn_norm;
    const wt *gate, *up, *up_bias, *down, *down_bias;      /* gate/up [I, H] rows; down [H, I] rows */
    const float *cos, *sin;                                 /* rotary tables [positions, head_dim] */
    int window;                                             /* sliding window, 0 = full attention */
    int keep;                                               /* FFN neurons run: the first `keep` */
    int down_neuron_major;                                  /* down stored [I, H] (a neuron per row) */
} Layer;

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, capacity, act, gated, max_threads;
    float eps, norm_offset, attention_scale, attention_softcap, final_softcap, embed_scale;
    const wt *embed, *final_norm, *lm_head;
    float *k_cache, *v_cache;                               /* [layers, kv_heads, capacity, head_dim] */
    const Layer *layer;
    float *x, *h, *a, *q, *kv, *attn, *u, *y, *scores, *partial;   /* scratch, laid out by dart_bind_scratch */
} Model;

/* Floats of scratch a model needs; the caller allocates them and binds them with dart_bind_scratch. */
long dart_max_tokens(void) { return MAX_TOKENS; }

long dart_scratch_floats(const Model *m) {
    long T = MAX_TOKENS, q = (long)m->heads * m->head_dim, kv = 2L * m->kv_heads * m->head_dim;
    return T * (4L * m->hidden + 2 * q + kv + m->intermediate) + T * m->heads * m->capacity
           + (long)m->max_threads * T * m->hidden;
}

void dart_bind_scratch(Model *m, float *scratch) {
    long T = MAX_TOKENS, q = (long)m->heads * m->head_dim, kv = 2L * m->kv_heads * m->head_dim;
    m->x = scratch; m->h = m->x + T * m->hidden; m->a = m->h + T * m->hidden; m->y = m->a + T * m->hidden;
    m->q = m->y + T * m->hidden; m->kv = m->q + T * q; m->attn = m->kv + T * kv; m->u = m->attn + T * q;
    m->scores = m->u + T * m->intermediate; m->partial = m->scores + T * m->heads * m->capacity;
}

static void rms_norm(const float *x, const wt *w, float *out, int n, float eps, float offset) {
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += (double)x[i] * x[i];
    float scale = 1.0f / sqrtf((float)(sum / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * (wf(w[i]) + offset);
}

static inline float sum8(v8 v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* a . b with four independent vector sums: one running sum would wait on the latency of every add (a chain of
 * dependent FMAs), four keep the vector units busy */
static inline float dot(const float *a, const float *b, int n) {
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int c = 0;
    for (; c + 32 <= n; c += 32) {
        s0 += load8(a + c) * load8(b + c);
        s1 += load8(a + c + 8) * load8(b + c + 8);
        s2 += load8(a + c + 16) * load8(b + c + 16);
        s3 += load8(a + c + 24) * load8(b + c + 24);
    }
    for (; c + 8 <= n; c += 8) s0 += load8(a + c) * load8(b + c);
    float s = sum8((s0 + s1) + (s2 + s3));
    for (; c < n; c++) s += a[c] * b[c];
    return s;
}

/* w . x for a weight row w: as `dot`, each weight widened as it is loaded */
static inline float dotw(const wt *w, const float *x, int n) {
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int c = 0;
    for (; c + 32 <= n; c += 32) {
        s0 += loadw8(w + c) * load8(x + c);
        s1 += loadw8(w + c + 8) * load8(x + c + 8);
        s2 += loadw8(w + c + 16) * load8(x + c + 16);
        s3 += loadw8(w + c + 24) * load8(x + c + 24);
    }
    for (; c + 8 <= n; c += 8) s0 += loadw8(w + c) * load8(x + c);
    float s = sum8((s0 + s1) + (s2 + s3));
    for (; c < n; c++) s += wf(w[c]) * x[c];
    return s;
}

/* out[t] = w . x[t] for t < T: the row is read once for all tokens, four tokens at a time (four independent
 * vector sums), a remaining token by `dot` */
static void dots(const wt *w, const float *x, long ldx, int cols, int T, float *out) {
    int t = 0;
    for (; t + 4 <= T; t += 4) {
        const float *x0 = x + t * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int c = 0;
        for (; c + 8 <= cols; c += 8) {
            v8 wv = loadw8(w + c);
            a0 += wv * load8(x0 + c);
            a1 += wv * load8(x1 + c);
            a2 += wv * load8(x2 + c);
            a3 += wv * load8(x3 + c);
        }
        float s0 = sum8(a0), s1 = sum8(a1), s2 = sum8(a2), s3 = sum8(a3);
        for (; c < cols; c++) {
            float wc = wf(w[c]);
            s0 += wc * x0[c]; s1 += wc * x1[c]; s2 += wc * x2[c]; s3 += wc * x3[c];
        }
        out[t] = s0; out[t + 1] = s1; out[t + 2] = s2; out[t + 3] = s3;
    }
    for (; t < T; t++) out[t] = dotw(w, x + t * ldx, cols);
}

/* y[t, r] = W[r, 0:cols] . x[t] (+ b[r]) for T tokens (x rows of ldx, y rows of ldy): weight rows split over
 * the team, each read once for all tokens (call inside a parallel region) */
static void matmul(const wt *W, long ld, const float *x, long ldx, const wt *b, float *y, long ldy, int rows,
                   int cols, int T) {
    #pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) {
        float out[MAX_TOKENS];
        dots(W + (long)r * ld, x, ldx, cols, T, out);
        for (int t = 0; t < T; t++) y[t * ldy + r] = b ? out[t] + wf(b[r]) : out[t];
    }
}

static float activate(float x, int act) {
    if (act == 0) return x / (1.0f + expf(-x));                                       /* SiLU */
    if (act == 1) return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));                          /* exact GELU */
}

/* u[t, i] = act(gate[i] . x[t]) * (up[i] . x[t]) for the first n neurons (gated), or act(up[i] . x[t] + b[i]) */
static void ffn_in(const Model *m, const Layer *L, const float *x, float *u, int n, int T) {
    int H = m->hidden, I = m->intermediate;
    #pragma omp for schedule(static)
    for (int i = 0; i < n; i++) {
        float su[MAX_TOKENS], sg[MAX_TOKENS];
        dots(L->up + (long)i * H, x, H, H, T, su);
        if (m->gated) dots(L->gate + (long)i * H, x, H, H, T, sg);
        for (int t = 0; t < T; t++)
            u[(long)t * I + i] = m->gated ? activate(sg[t], m->act) * su[t]
                                          : activate(L->up_bias ? su[t] + wf(L->up_bias[i]) : su[t], m->act);
    }
}

/* y = sum_{i < n} u[i] * D[i, :] (+ b) for a neuron-major down [I, H]: every thread sums its share of the neurons
 * into its own partial vector, then the partials are added (contiguous rows stream at the speed of memory, where
 * a prefix of the columns of a [H, I] matrix does not) */
static void down_rows(const Model *m, const wt *D, const float *u, const wt *b, float *y, int n, int T) {
    int H = m->hidden, I = m->intermediate, me = omp_get_thread_num(), threads = omp_get_num_threads();
    float *p = m->partial + (long)me * MAX_TOKENS * H;
    memset(p, 0, (size_t)T * H * sizeof(float));
    #pragma omp for schedule(static)
    for (int i = 0; i < n; i++) {
        const wt *w = D + (long)i * H;
        for (int t = 0; t < T; t++) {
            float ui = u[(long)t * I + i], *pt = p + (long)t * H;
            v8 uv = {ui, ui, ui, ui, ui, ui, ui, ui};
            int c = 0;
            for (; c + 8 <= H; c += 8) {
                v8 acc = load8(pt + c) + uv * loadw8(w + c);
                memcpy(pt + c, &acc, sizeof acc);
            }
            for (; c < H; c++) pt[c] += ui * wf(w[c]);
        }
    }
    #pragma omp for schedule(static)
    for (int c = 0; c < H; c++) {
        for (int t = 0; t < T; t++) {
            float sum = b ? wf(b[c]) : 0.0f;
            for (int j = 0; j < threads; j++) sum += m->partial[((long)j * MAX_TOKENS + t) * H + c];
            y[(long)t * H + c] = sum;
        }
    }
}

static void rotate(float *v, const float *cos, const float *sin, int d) {
    int half = d / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* T tokens at positions start .. start + T - 1 (the cache holds positions [0, start)). Writes logits [T, vocab];
 * when given, each layer's FFN inputs into ffn_inputs [layers, T, hidden] and the attention outputs (after o_proj,
 * before any norm) of the layers in `monitored` into attention_out [n_monitored, T, hidden]. Returns -1 (and does
 * nothing) when T is out of range. */
int dart_forward(const Model *m, const int *tokens, int T, int start, float *logits, float *ffn_inputs,
                 const int *monitored, int n_monitored, float *attention_out, int threads) {
    if (T < 1 || T > MAX_TOKENS || start + T > m->capacity) return -1;
    const int H = m->hidden, D = m->head_dim, NH = m->heads, KVH = m->kv_heads, group = m->heads / m->kv_heads;
    const int QN = NH * D, KN = KVH * D, I = m->intermediate;
    float *x = m->x, *h = m->h, *q = m->q, *k = m->kv, *v = m->kv + (long)T * KN, *attn = m->attn, *a = m->a;
    float *u = m->u, *y = m->y;
    for (int t = 0; t < T; t++) {
        const wt *row = m->embed + (long)tokens[t] * H;
        for (int i = 0; i < H; i++) x[(long)t * H + i] = wf(row[i]) * m->embed_scale;
    }
    if (threads > m->max_threads) threads = m->max_threads;
    omp_set_num_threads(threads);
    #pragma omp parallel
    {
        for (int l = 0; l < m->layers; l++) {
            const Layer *L = &m->layer[l];
            #pragma omp single
            for (int t = 0; t < T; t++) rms_norm(x + (long)t * H, L->input_norm, h + (long)t * H, H, m->eps, m->norm_offset);
            matmul(L->q, H, h, H, L->q_bias, q, QN, QN, H, T);
            matmul(L->k, H, h, H, L->k_bias, k, KN, KN, H, T);
            matmul(L->v, H, h, H, L->v_bias, v, KN, KN, H, T);
            #pragma omp single
            for (int t = 0; t < T; t++) {
                int pos = start + t;
                for (int head = 0; head < NH; head++) {
                    float *qh = q + (long)t * QN + head * D;
                    if (L->q_norm) rms_norm(qh, L->q_norm, qh, D, m->eps, m->norm_offset);
                    rotate(qh, L->cos + (long)pos * D, L->sin + (long)pos * D, D);
                }
                for (int head = 0; head < KVH; head++) {
                    float *kh = k + (long)t * KN + head * D;
                    if (L->k_norm) rms_norm(kh, L->k_norm, kh, D, m->eps, m->norm_offset);
                    rotate(kh, L->cos + (long)pos * D, L->sin + (long)pos * D, D);
                    long at = (((long)l * KVH + head) * m->capacity + pos) * D;
                    memcpy(m->k_cache + at, kh, D * sizeof(float));
                    memcpy(m->v_cache + at, v + (long)t * KN + head * D, D * sizeof(float));
                }
            }
            #pragma omp for schedule(static)
            for (int item = 0; item < NH * T; item++) {
                int head = item % NH, t = item / NH, pos = start + t, kvh = head / group;
                int first = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
                const float *kc = m->k_cache + ((long)l * KVH + kvh) * m->capacity * D;
                const float *vc = m->v_cache + ((long)l * KVH + kvh) * m->capacity * D;
                float *s = m->scores + (long)item * m->capacity, *qh = q + (long)t * QN + head * D, top = -INFINITY;
                for (int p = first; p <= pos; p++) {
                    float score = dot(qh, kc + (long)p * D, D) * m->attention_scale;
                    if (m->attention_softcap > 0) score = tanhf(score / m->attention_softcap) * m->attention_softcap;
                    s[p] = score;
                    if (score > top) top = score;
                }
                float total = 0.0f;
                for (int p = first; p <= pos; p++) { s[p] = expf(s[p] - top); total += s[p]; }
                float *out = attn + (long)t * QN + head * D;
                for (int c = 0; c < D; c++) out[c] = 0.0f;
                for (int p = first; p <= pos; p++) {
                    float w = s[p] / total;
                    #pragma omp simd
                    for (int c = 0; c < D; c++) out[c] += w * vc[(long)p * D + c];
                }
            }
            matmul(L->o, QN, attn, QN, L->o_bias, a, H, H, QN, T);
            #pragma omp single
            for (int t = 0; t < T; t++) {
                float *at = a + (long)t * H, *xt = x + (long)t * H, *ht = h + (long)t * H;
                for (int j = 0; j < n_monitored; j++)
                    if (monitored[j] == l) memcpy(attention_out + ((long)j * T + t) * H, at, H * sizeof(float));
                if (L->post_attention_norm) rms_norm(at, L->post_attention_norm, at, H, m->eps, m->norm_offset);
                for (int i = 0; i < H; i++) xt[i] += at[i];
                rms_norm(xt, L->ffn_norm, ht, H, m->eps, m->norm_offset);
                if (ffn_inputs) memcpy(ffn_inputs + ((long)l * T + t) * H, ht, H * sizeof(float));
            }
            ffn_in(m, L, h, u, L->keep, T);
            if (L->down_neuron_major) down_rows(m, L->down, u, L->down_bias, y, L->keep, T);
            else matmul(L->down, I, u, I, L->down_bias, y, H, H, L->keep, T);
            #pragma omp single
            for (int t = 0; t < T; t++) {
                float *yt = y + (long)t * H, *xt = x + (long)t * H;
                if (L->post_ffn_norm) rms_norm(yt, L->post_ffn_norm, yt, H, m->eps, m->norm_offset);
                for (int i = 0; i < H; i++) xt[i] += yt[i];
                if (l == m->layers - 1) rms_norm(xt, m->final_norm, h + (long)t * H, H, m->eps, m->norm_offset);
            }
        }
        matmul(m->lm_head, H, h, H, NULL, logits, m->vocab, m->vocab, H, T);
    }
    if (m->final_softcap > 0)
        for (long i = 0; i < (long)T * m->vocab; i++) logits[i] = tanhf(logits[i] / m->final_softcap) * m->final_softcap;
    return 0;
}
