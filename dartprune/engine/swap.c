/* In-place moves of neurons in the FFN weights, for PrefixFFN's swaps and restore (weights.py).
 *
 * A neuron is a row of a contiguous row-major matrix (gate and up, the down projection laid out neuron-major) or a
 * column of one (the down projection kept row-major in reduced precision on a CPU, where PyTorch's matmuls over
 * the neuron-major layout are slow). PyTorch's index_select + index_copy_ goes through a temporary: every moved
 * row is read twice and written twice, and the temporary's fresh pages fault in (a column gather is a strided read
 * besides). Here each pair is exchanged in place (rows: through a small stack buffer; columns: row by row of the
 * matrix, so each row is read and written once while it is in cache), spread over the threads. Any dtype: rows are
 * bytes, columns elements of 2, 4 or 8 bytes.
 * The caller guarantees what index_copy_ would check: every index in range, and a and b disjoint (no row in two
 * pairs, no row paired with itself). PrefixFFN.keep passes prefix positions that leave and outside ones that
 * enter. */
#include <omp.h>
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

/* Whether order is a permutation of 0..n-1: 1 yes, 0 no, -1 when the check cannot allocate its bookkeeping. */
static int is_permutation(const int32_t *order, int64_t n) {
    char *seen = calloc((size_t)n, 1);
    if (!seen) return -1;
    for (int64_t p = 0; p < n; p++) {
        if (order[p] < 0 || order[p] >= n || seen[order[p]]) { free(seen); return 0; }
        seen[order[p]] = 1;
    }
    free(seen);
    return 1;
}

#define SWAP_COLUMNS(type) do {                                                   \
        type *row = (type *)(base + r * row_bytes);                              \
        for (int64_t i = 0; i < n; i++) {                                         \
            type tmp = row[a[i]]; row[a[i]] = row[b[i]]; row[b[i]] = tmp;         \
        }                                                                         \
    } while (0)

/* Exchange columns a[i] and b[i] (i < n) of a row-major matrix of `rows` rows, `row_bytes` apart, whose elements
 * are `elem_bytes` wide: 2, 4 or 8, which the caller guarantees as it does the indices (PrefixFFN._compiled_moves
 * hands no other width). */
void dart_swap_cols(char *base, int64_t rows, int64_t row_bytes, int elem_bytes, const int64_t *a, const int64_t *b,
                    int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (elem_bytes == 2) SWAP_COLUMNS(uint16_t);
        else if (elem_bytes == 4) SWAP_COLUMNS(uint32_t);
        else SWAP_COLUMNS(uint64_t);
    }
}

/* Every column of a row-major matrix (`rows` rows `row_bytes` apart, n columns of `elem_bytes`) back to its own
 * position: the column now at position p belongs at position order[p]. Row by row through a copy of the row (each
 * row read and written once). Returns 0; -1 when the rows' copies cannot be allocated, -2 when order is not a
 * permutation of 0..n-1 (nothing moved in either case). */
int dart_unpermute_cols(char *base, int64_t rows, int64_t row_bytes, int elem_bytes, const int32_t *order, int64_t n,
                        int threads) {
    int ok = is_permutation(order, n);
    if (ok <= 0) return ok == 0 ? -2 : -1;
    char *copies = malloc((size_t)threads * (size_t)(n * elem_bytes));      /* one row's copy per thread */
    if (!copies) return -1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        char *row = base + r * row_bytes, *copy = copies + (int64_t)omp_get_thread_num() * n * elem_bytes;
        memcpy(copy, row, (size_t)(n * elem_bytes));
        for (int64_t p = 0; p < n; p++)
            memcpy(row + (int64_t)order[p] * elem_bytes, copy + p * elem_bytes, (size_t)elem_bytes);
    }
    free(copies);
    return 0;
}

/* Every row of `count` matrices back to its own position: in each, the row now at position p belongs at position
 * order[p]. Each cycle of the permutation is followed carrying one piece of a row in a small stack buffer: every
 * misplaced row is read once and written once (PyTorch's index_select + index_copy_ reads and writes each twice,
 * through a fresh temporary as large as all of them). Cycles are disjoint, so they spread over the threads.
 * Returns 0; -1 when the bookkeeping cannot be allocated, -2 when order is not a permutation of 0..n-1 (nothing
 * moved in either case). */
int dart_unpermute_rows(char *const *bases, const int64_t *row_bytes, int count, const int32_t *order, int64_t n,
                        int threads) {
    int ok = is_permutation(order, n);
    if (ok <= 0) return ok == 0 ? -2 : -1;
    char *seen = calloc((size_t)n, 1);
    int64_t *starts = malloc((size_t)n * sizeof *starts);
    int64_t cycles = 0;
    if (!seen || !starts) { free(seen); free(starts); return -1; }
    for (int64_t p = 0; p < n; p++) {              /* one start per cycle of length > 1 */
        if (seen[p] || order[p] == p) continue;
        starts[cycles++] = p;
        seen[p] = 1;
        for (int64_t q = order[p]; q != p; q = order[q]) seen[q] = 1;
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
