/* In-place exchange of rows of a contiguous row-major matrix, for PrefixFFN's neuron swaps (weights.py).
 *
 * PyTorch's index_select + index_copy_ goes through a temporary: every moved row is read twice and written twice,
 * and the temporary's fresh pages fault in. Here each pair is exchanged through a small stack buffer (one read and
 * one write per row), the pairs spread over the threads. Any dtype: rows are bytes.
 * The caller guarantees what index_copy_ would check: every index in range, and a and b disjoint (no row in two
 * pairs, no row paired with itself). PrefixFFN.keep passes prefix positions that leave and outside ones that
 * enter. */
#include <stdint.h>
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
