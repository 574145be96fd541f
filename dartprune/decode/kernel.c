/* One decode step of a Llama- or Gemma-family decoder for a batch of one, float32 weights read in place.
 *
 * Built by dartprune/decode/kernel.py with the system C compiler (gcc or clang, OpenMP) and loaded with ctypes.
 * The whole step runs in one OpenMP parallel region: matrix-vector products split their rows over the threads,
 * attention splits its heads, and the small vector work (norms, rotary, residual adds) runs on one thread between
 * barriers. Every weight matrix is read once per token at the speed of memory, which is what a decode step is
 * bound by; a pruned FFN reads only the first `keep` neurons of its (permuted) weights.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <omp.h>

typedef struct {
    const float *input_norm, *q, *k, *v, *o, *q_bias, *k_bias, *v_bias, *o_bias;
    const float *q_norm, *k_norm, *post_attention_norm, *ffn_norm, *post_ffn_norm;
    const float *gate, *up, *up_bias, *down, *down_bias;   /* gate/up [I, H] rows; down [H, I] rows */
    const float *cos, *sin;                                 /* rotary tables [positions, head_dim] */
    int window;                                             /* sliding window, 0 = full attention */
    int keep;                                               /* FFN neurons run: the first `keep` */
    int down_neuron_major;                                  /* down stored [I, H] (a neuron per row) */
} Layer;

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, capacity, act, gated, max_threads;
    float eps, norm_offset, attention_scale, attention_softcap, final_softcap, embed_scale;
    const float *embed, *final_norm, *lm_head;
    float *k_cache, *v_cache;                               /* [layers, kv_heads, capacity, head_dim] */
    const Layer *layer;
    float *x, *h, *a, *q, *kv, *attn, *u, *y, *scores, *partial;   /* scratch, laid out by dart_bind_scratch */
} Model;

/* Floats of scratch a model needs; the caller allocates them and binds them with dart_bind_scratch. */
long dart_scratch_floats(const Model *m) {
    long q = (long)m->heads * m->head_dim, kv = 2L * m->kv_heads * m->head_dim;
    return 4L * m->hidden + 2 * q + kv + m->intermediate + (long)m->heads * m->capacity
           + (long)m->max_threads * m->hidden;
}

void dart_bind_scratch(Model *m, float *scratch) {
    long q = (long)m->heads * m->head_dim, kv = 2L * m->kv_heads * m->head_dim;
    m->x = scratch; m->h = m->x + m->hidden; m->a = m->h + m->hidden; m->y = m->a + m->hidden;
    m->q = m->y + m->hidden; m->kv = m->q + q; m->attn = m->kv + kv; m->u = m->attn + q;
    m->scores = m->u + m->intermediate; m->partial = m->scores + (long)m->heads * m->capacity;
}

static void rms_norm(const float *x, const float *w, float *out, int n, float eps, float offset) {
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += (double)x[i] * x[i];
    float scale = 1.0f / sqrtf((float)(sum / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * (w[i] + offset);
}

/* y[r] = W[r, 0:cols] . x (+ b[r]) for r in [0, rows): rows split over the team (call inside a parallel region) */
static void matvec(const float *W, long ld, const float *x, const float *b, float *y, int rows, int cols) {
    #pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *w = W + (long)r * ld;
        float acc = 0.0f;
        #pragma omp simd reduction(+:acc)
        for (int c = 0; c < cols; c++) acc += w[c] * x[c];
        y[r] = b ? acc + b[r] : acc;
    }
}

static float activate(float x, int act) {
    if (act == 0) return x / (1.0f + expf(-x));                                       /* SiLU */
    if (act == 1) return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));                          /* exact GELU */
}

/* u[i] = act(gate[i] . x) * (up[i] . x) for the first n neurons (gated), or act(up[i] . x + b[i]) */
static void ffn_in(const Model *m, const Layer *L, const float *x, float *u, int n) {
    int H = m->hidden;
    #pragma omp for schedule(static)
    for (int i = 0; i < n; i++) {
        const float *wu = L->up + (long)i * H;
        float su = 0.0f;
        if (m->gated) {
            const float *wg = L->gate + (long)i * H;
            float sg = 0.0f;
            #pragma omp simd reduction(+:sg, su)
            for (int c = 0; c < H; c++) { sg += wg[c] * x[c]; su += wu[c] * x[c]; }
            u[i] = activate(sg, m->act) * su;
        } else {
            #pragma omp simd reduction(+:su)
            for (int c = 0; c < H; c++) su += wu[c] * x[c];
            u[i] = activate(L->up_bias ? su + L->up_bias[i] : su, m->act);
        }
    }
}

/* y = sum_{i < n} u[i] * D[i, :] (+ b) for a neuron-major down [I, H]: every thread sums its share of the neurons
 * into its own partial vector, then the partials are added (contiguous rows stream at the speed of memory, where
 * a prefix of the columns of a [H, I] matrix does not) */
static void down_rows(const Model *m, const float *D, const float *u, const float *b, float *y, int n) {
    int H = m->hidden, t = omp_get_thread_num(), threads = omp_get_num_threads();
    float *p = m->partial + (long)t * H;
    memset(p, 0, H * sizeof(float));
    #pragma omp for schedule(static)
    for (int i = 0; i < n; i++) {
        const float *w = D + (long)i * H;
        float ui = u[i];
        #pragma omp simd
        for (int c = 0; c < H; c++) p[c] += ui * w[c];
    }
    #pragma omp for schedule(static)
    for (int c = 0; c < H; c++) {
        float sum = b ? b[c] : 0.0f;
        for (int j = 0; j < threads; j++) sum += m->partial[(long)j * H + c];
        y[c] = sum;
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

/* One token at position `pos` (the cache holds positions [0, pos)). Writes logits [vocab]; when given, each
 * layer's FFN input into ffn_inputs [layers, hidden] and the attention output (after o_proj, before any norm)
 * of the layers in `monitored` into attention_out [n_monitored, hidden]. */
void dart_step(const Model *m, int token, int pos, float *logits, float *ffn_inputs, const int *monitored,
               int n_monitored, float *attention_out, int threads) {
    const int H = m->hidden, D = m->head_dim, NH = m->heads, KVH = m->kv_heads, group = m->heads / m->kv_heads;
    const int QN = NH * D, KN = KVH * D;
    float *x = m->x, *h = m->h, *q = m->q, *k = m->kv, *v = m->kv + KN, *attn = m->attn, *a = m->a;
    float *u = m->u, *y = m->y;
    const float *row = m->embed + (long)token * H;
    for (int i = 0; i < H; i++) x[i] = row[i] * m->embed_scale;
    if (threads > m->max_threads) threads = m->max_threads;
    omp_set_num_threads(threads);
    #pragma omp parallel
    {
        for (int l = 0; l < m->layers; l++) {
            const Layer *L = &m->layer[l];
            #pragma omp single
            rms_norm(x, L->input_norm, h, H, m->eps, m->norm_offset);
            matvec(L->q, H, h, L->q_bias, q, QN, H);
            matvec(L->k, H, h, L->k_bias, k, KN, H);
            matvec(L->v, H, h, L->v_bias, v, KN, H);
            #pragma omp single
            {
                for (int head = 0; head < NH; head++) {
                    if (L->q_norm) rms_norm(q + head * D, L->q_norm, q + head * D, D, m->eps, m->norm_offset);
                    rotate(q + head * D, L->cos + (long)pos * D, L->sin + (long)pos * D, D);
                }
                for (int head = 0; head < KVH; head++) {
                    if (L->k_norm) rms_norm(k + head * D, L->k_norm, k + head * D, D, m->eps, m->norm_offset);
                    rotate(k + head * D, L->cos + (long)pos * D, L->sin + (long)pos * D, D);
                    long at = (((long)l * KVH + head) * m->capacity + pos) * D;
                    memcpy(m->k_cache + at, k + head * D, D * sizeof(float));
                    memcpy(m->v_cache + at, v + head * D, D * sizeof(float));
                }
            }
            int first = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
            #pragma omp for schedule(static)
            for (int head = 0; head < NH; head++) {
                int kvh = head / group;
                const float *kc = m->k_cache + ((long)l * KVH + kvh) * m->capacity * D;
                const float *vc = m->v_cache + ((long)l * KVH + kvh) * m->capacity * D;
                float *s = m->scores + (long)head * m->capacity, *qh = q + head * D, top = -INFINITY;
                for (int t = first; t <= pos; t++) {
                    float dot = 0.0f;
                    #pragma omp simd reduction(+:dot)
                    for (int c = 0; c < D; c++) dot += qh[c] * kc[(long)t * D + c];
                    dot *= m->attention_scale;
                    if (m->attention_softcap > 0) dot = tanhf(dot / m->attention_softcap) * m->attention_softcap;
                    s[t] = dot;
                    if (dot > top) top = dot;
                }
                float total = 0.0f;
                for (int t = first; t <= pos; t++) { s[t] = expf(s[t] - top); total += s[t]; }
                float *out = attn + head * D;
                for (int c = 0; c < D; c++) out[c] = 0.0f;
                for (int t = first; t <= pos; t++) {
                    float p = s[t] / total;
                    #pragma omp simd
                    for (int c = 0; c < D; c++) out[c] += p * vc[(long)t * D + c];
                }
            }
            matvec(L->o, QN, attn, L->o_bias, a, H, QN);
            #pragma omp single
            {
                for (int j = 0; j < n_monitored; j++)
                    if (monitored[j] == l) memcpy(attention_out + (long)j * H, a, H * sizeof(float));
                if (L->post_attention_norm) rms_norm(a, L->post_attention_norm, a, H, m->eps, m->norm_offset);
                for (int i = 0; i < H; i++) x[i] += a[i];
                rms_norm(x, L->ffn_norm, h, H, m->eps, m->norm_offset);
                if (ffn_inputs) memcpy(ffn_inputs + (long)l * H, h, H * sizeof(float));
            }
            ffn_in(m, L, h, u, L->keep);
            if (L->down_neuron_major) down_rows(m, L->down, u, L->down_bias, y, L->keep);
            else matvec(L->down, m->intermediate, u, L->down_bias, y, H, L->keep);
            #pragma omp single
            {
                if (L->post_ffn_norm) rms_norm(y, L->post_ffn_norm, y, H, m->eps, m->norm_offset);
                for (int i = 0; i < H; i++) x[i] += y[i];
                if (l == m->layers - 1) rms_norm(x, m->final_norm, h, H, m->eps, m->norm_offset);
            }
        }
        matvec(m->lm_head, H, h, NULL, logits, m->vocab, H);
    }
    if (m->final_softcap > 0)
        for (int i = 0; i < m->vocab; i++) logits[i] = tanhf(logits[i] / m->final_softcap) * m->final_softcap;
}
