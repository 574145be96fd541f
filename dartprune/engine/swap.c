/* In-place moves of rows of a contiguous row-major matrix, for PrefixFFN's neuron swaps and restore (weights.py).
 *
 * PyTorch's index_select + index_copy_ goes through a temporary: every moved row is read twice and written twice,
 * and the temporary's fresh pages fault in. Here each pair is exchanged through a small stack buffer (one read and
 * one write per row), the pairs spread over the threads. Any dtype: rows are bytes.
 * The caller guarantees what index_copy_ would check: every index in range, and a and b disjoint (no row in two
 * pairs, no row paired with itself). PrefixFFN.keep passes prefix positions that leave and outside ones that
 * enter. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void dart_swap_rows(char *base, int64_t row_bytes, const int64_t *a, const int64_t *b, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        char *p = base + a[i] * row_bytes, *q = base + b[i] * row_bytes;
        char tmp[2048];
        for (int64_t off = 0; off < row_bytes; off += (int64_t)sizeof tmp) {
            int64_t len = row_bytes - off < (int64_t)sizeof tmp ? row_bytes - off : (int64_t)sizeof tmp;
            memcpy(tmp, p + off, len);
            memcpy(p + off, q + off, len);
            memcpy(q + off, tmp, len);
        }
    }
}

/* Every row of `count` matrices back to its own position: in each, the row now at position p belongs at position
 * order[p]. Each cycle of the permutation is followed carrying one piece of a row in a small stack buffer: every
 * misplaced row is read once and written once (PyTorch's index_select + index_copy_ reads and writes each twice,
 * through a fresh temporary as large as all of them). Cycles are disjoint, so they spread over the threads.
 * Returns 0; -1 when the bookkeeping cannot be allocated, -2 when order is not a permutation of 0..n-1 (nothing
 * moved in either case). */
int dart_unpermute_rows(char *const *bases, const int64_t *row_bytes, int count, const int32_t *order, int64_t n,
                        int threads) {
    char *seen = calloc((size_t)n, 1);
    int64_t *starts = malloc((size_t)n * sizeof *starts);
    int64_t cycles = 0;
    if (!seen || !starts) { free(seen); free(starts); return -1; }
    for (int64_t p = 0; p < n; p++)                /* every destination in range ... */
        if (order[p] < 0 || order[p] >= n) { free(seen); free(starts); return -2; }
    for (int64_t p = 0; p < n; p++) {              /* ... and one start per cycle of length > 1 */
        if (seen[p] || order[p] == p) continue;
        starts[cycles++] = p;
        seen[p] = 1;
        for (int64_t q = order[p]; q != p; q = order[q]) {
            if (seen[q]) { free(seen); free(starts); return -2; }   /* two rows bound for q */
            seen[q] = 1;
        }
    }
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(dynamic, 16)
    for (int m = 0; m < count; m++) {
        for (int64_t c = 0; c < cycles; c++) {
            char *base = bases[m];
            int64_t bytes = row_bytes[m], p = starts[c];
            char carry[2048], tmp[2048];
            for (int64_t off = 0; off < bytes; off += (int64_t)sizeof carry) {
                int64_t len = bytes - off < (int64_t)sizeof carry ? bytes - off : (int64_t)sizeof carry;
                memcpy(carry, base + p * bytes + off, len);          /* the piece at p, on its way to order[p] */
                for (int64_t q = order[p]; q != p; q = order[q]) {   /* drop it at q, pick up the one there */
                    char *piece = base + q * bytes + off;
                    memcpy(tmp, piece, len);
                    memcpy(piece, carry, len);
                    memcpy(carry, tmp, len);
                }
                memcpy(base + p * bytes + off, carry, len);          /* the cycle closes: the last piece is p's */
            }
        }
    }
    free(seen);
    free(starts);
    return 0;
}
