/* The sample predictor's residual planes (docs/store-format.md §4.3.1), for codec.py.

   numpy had to run each step (predict, zigzag, bit-plane transpose, and back) as its own pass
   over the chunk, and could only accumulate along a row element by element: decoding took
   ~1.6 ms per MiB besides zstd, more than zstd itself. Here each step is one loop over a
   buffer of native integers that the compiler vectorises, or, for the prediction along a
   row, a plain scalar recurrence. The GIL is released around the loops: codec.py's callers
   run chunks in worker threads.

   A body holds samples of 8 bits, 16 bits in either byte order, or 10, 12 or 14 bits packed
   (`bits`); they are worked on as W-byte unsigned integers (W = `width`: 1 for 8 bits, else
   2), all arithmetic modulo 2^(8W). Python-facing functions:
     planes(body, bits, big_endian, period, stride) -> bytes
     samples(planes, count, bits, big_endian, period, stride) -> bytes   (the inverse)
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Each 64-bit word as an 8x8 matrix of bits (byte k, bit j), transposed: bit j of byte k
   trades places with bit k of byte j (its own inverse). */
static inline uint64_t transpose8(uint64_t v)
{
    uint64_t t;
    t = ((v >> 7) ^ v) & 0x00AA00AA00AA00AAULL;
    v ^= t ^ (t << 7);
    t = ((v >> 14) ^ v) & 0x0000CCCC0000CCCCULL;
    v ^= t ^ (t << 14);
    t = ((v >> 28) ^ v) & 0x00000000F0F0F0F0ULL;
    v ^= t ^ (t << 28);
    return v;
}

/* A word whose byte k (in memory) is its bits 8k..8k+7, whatever the machine's byte order. */
static inline uint64_t little_endian(uint64_t v)
{
#if PY_BIG_ENDIAN
    return __builtin_bswap64(v);
#else
    return v;
#endif
}

/* The first sample predicted from `stride` back (H in the format), as the format says. */
static inline Py_ssize_t head_of(Py_ssize_t count, Py_ssize_t stride)
{
    return stride == 0 || stride > count ? count : stride;
}

/* Samples of `bits` 10, 12 or 14 packed without gaps, most significant bit first, in groups of
   G bytes holding S samples: each group one big-endian integer of 8G bits, its sample k in
   bits 8G - bits(k+1) up. Inlined with constant arguments, so each packing gets its own loop. */
static inline void unpack_groups(const uint8_t *in, Py_ssize_t groups, int g, int s, int bits,
                                 uint16_t *x)
{
    for (Py_ssize_t i = 0; i < groups; i++, in += g, x += s) {
        uint64_t v = 0;
        for (int j = 0; j < g; j++)
            v = v << 8 | in[j];
        for (int k = 0; k < s; k++)
            x[k] = (uint16_t)(v >> (8 * g - bits * (k + 1)) & ((1u << bits) - 1));
    }
}

/* The inverse (a sample above 2^bits - 1 is masked: the chunk's hash then says it is damaged). */
static inline void pack_groups(const uint16_t *x, Py_ssize_t groups, int g, int s, int bits,
                               uint8_t *out)
{
    for (Py_ssize_t i = 0; i < groups; i++, out += g, x += s) {
        uint64_t v = 0;
        for (int k = 0; k < s; k++)
            v |= (uint64_t)(x[k] & ((1u << bits) - 1)) << (8 * g - bits * (k + 1));
        for (int j = g - 1; j >= 0; j--, v >>= 8)
            out[j] = (uint8_t)v;
    }
}

/* G bytes hold S samples (the format's groups), by bits per sample; 0 for no such layout. */
static int group_bytes(int bits)
{
    return bits == 8 ? 1 : bits == 10 ? 5 : bits == 12 ? 3 : bits == 14 ? 7 : bits == 16 ? 2 : 0;
}

static int group_samples(int bits)
{
    return bits == 10 || bits == 14 ? 4 : bits == 12 ? 2 : 1;
}

/* The n samples of a body (whole groups) as native integers. */
static void load(const uint8_t *in, Py_ssize_t n, int bits, int big_endian, uint16_t *x)
{
    switch (bits) {
    case 8:
        for (Py_ssize_t i = 0; i < n; i++)
            x[i] = in[i];
        break;
    case 10:
        unpack_groups(in, n / 4, 5, 4, 10, x);
        break;
    case 12:
        unpack_groups(in, n / 2, 3, 2, 12, x);
        break;
    case 14:
        unpack_groups(in, n / 4, 7, 4, 14, x);
        break;
    default:
        if (big_endian) {
            for (Py_ssize_t i = 0; i < n; i++)
                x[i] = (uint16_t)(in[2 * i] << 8 | in[2 * i + 1]);
        } else {
            for (Py_ssize_t i = 0; i < n; i++)
                x[i] = (uint16_t)(in[2 * i] | in[2 * i + 1] << 8);
        }
    }
}

/* The inverse of `load`. */
static void store(const uint16_t *x, Py_ssize_t n, int bits, int big_endian, uint8_t *out)
{
    switch (bits) {
    case 8:
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = (uint8_t)x[i];
        break;
    case 10:
        pack_groups(x, n / 4, 5, 4, 10, out);
        break;
    case 12:
        pack_groups(x, n / 2, 3, 2, 12, out);
        break;
    case 14:
        pack_groups(x, n / 4, 7, 4, 14, out);
        break;
    default:
        if (big_endian) {
            for (Py_ssize_t i = 0; i < n; i++) {
                out[2 * i] = (uint8_t)(x[i] >> 8);
                out[2 * i + 1] = (uint8_t)x[i];
            }
        } else {
            for (Py_ssize_t i = 0; i < n; i++) {
                out[2 * i] = (uint8_t)x[i];
                out[2 * i + 1] = (uint8_t)(x[i] >> 8);
            }
        }
    }
}

/* z[i] = zigzag(x[i] - p[i]); p from `period` back before H, from `stride` back after. */
static void residuals(const uint16_t *x, Py_ssize_t n, int width, Py_ssize_t period,
                      Py_ssize_t stride, uint16_t *z)
{
    const unsigned mask = width == 1 ? 0xFF : 0xFFFF, sign = 8 * width - 1;
    const Py_ssize_t head = head_of(n, stride), first = period < head ? period : head;
    for (Py_ssize_t i = 0; i < first; i++)
        z[i] = x[i];
    for (Py_ssize_t i = first; i < head; i++)
        z[i] = (uint16_t)((x[i] - x[i - period]) & mask);
    for (Py_ssize_t i = head; i < n; i++)
        z[i] = (uint16_t)((x[i] - x[i - head]) & mask);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned r = z[i];
        z[i] = (uint16_t)(((r << 1) ^ (0u - (r >> sign))) & mask);
    }
}

/* x[i] = (r[i] + x[i - step]) mod 2^16 for from <= i < to, in place (r becomes x). A sample
   depends on the one `step` back: from a vector's length back on (gcc checks the distance at
   run time), a vector of samples at once; closer, each of the `step` interleaved chains is
   summed in a register (through memory, every addition would wait for the store before it). */
static void accumulate(uint16_t *r, Py_ssize_t from, Py_ssize_t to, Py_ssize_t step)
{
    if (step >= 16) {
        for (Py_ssize_t i = from; i < to; i++)
            r[i] = (uint16_t)(r[i] + r[i - step]);
        return;
    }
    for (Py_ssize_t chain = from; chain < from + step && chain < to; chain++) {
        uint16_t x = r[chain - step];
        for (Py_ssize_t i = chain; i < to; i += step)
            r[i] = x = (uint16_t)(x + r[i]);
    }
}

/* The inverse of `residuals`, in place: z becomes x. */
static void integrate(uint16_t *z, Py_ssize_t n, int width, Py_ssize_t period, Py_ssize_t stride)
{
    const unsigned mask = width == 1 ? 0xFF : 0xFFFF;
    const Py_ssize_t head = head_of(n, stride), first = period < head ? period : head;
    for (Py_ssize_t i = 0; i < n; i++) {  /* unzigzag */
        unsigned v = z[i];
        z[i] = (uint16_t)((v >> 1) ^ (0u - (v & 1)));
    }
    accumulate(z, first, head, period);
    accumulate(z, head, n, head);
    if (width == 1)  /* sums modulo 2^16 are right modulo 2^8 too */
        for (Py_ssize_t i = 0; i < n; i++)
            z[i] &= mask;
}

/* The planes of z (n values): for width 2 the low bytes, then the 8 bit planes of the top
   bytes (for width 1, of the values), padded with zeros to a multiple of 8 values. (The low
   bytes of sensor noise are near random, and zstd's Huffman coding takes them close to their
   entropy; the top bytes are mostly 0 or 1, which it cannot take below a bit each, and their
   bit planes are mostly zeros.) `w` is
   scratch space for (n + 7) / 8 words. Three loops that the compiler vectorises or keeps
   simple: the top bytes into words of 8, each word's bits transposed, the words' bytes out
   to the planes. */
static void to_planes(const uint16_t *z, Py_ssize_t n, int width, uint8_t *out, uint64_t *w)
{
    const Py_ssize_t groups = (n + 7) / 8;
    uint8_t *planes = out + (width == 2 ? n : 0), *top = (uint8_t *)w;
    if (groups)  /* the padding */
        memset(top + 8 * (groups - 1), 0, 8);
    if (width == 2) {
        for (Py_ssize_t i = 0; i < n; i++) {
            out[i] = (uint8_t)z[i];
            top[i] = (uint8_t)(z[i] >> 8);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++)
            top[i] = (uint8_t)z[i];
    }
    for (Py_ssize_t g = 0; g < groups; g++) {
        uint64_t v;
        memcpy(&v, top + 8 * g, 8);
        w[g] = transpose8(little_endian(v));
    }
    for (Py_ssize_t g = 0; g < groups; g++)
        for (int j = 0; j < 8; j++)
            planes[j * groups + g] = (uint8_t)(w[g] >> (8 * j));
}

/* The inverse of `to_planes`. */
static void from_planes(const uint8_t *in, Py_ssize_t n, int width, uint16_t *z, uint64_t *w)
{
    const Py_ssize_t groups = (n + 7) / 8;
    const uint8_t *planes = in + (width == 2 ? n : 0);
    uint8_t *top = (uint8_t *)w;
    for (Py_ssize_t g = 0; g < groups; g++) {
        uint64_t v = 0;
        for (int j = 0; j < 8; j++)
            v |= (uint64_t)planes[j * groups + g] << (8 * j);
        v = little_endian(transpose8(v));
        memcpy(top + 8 * g, &v, 8);
    }
    if (width == 2) {
        for (Py_ssize_t i = 0; i < n; i++)
            z[i] = (uint16_t)(top[i] << 8 | in[i]);
    } else {
        for (Py_ssize_t i = 0; i < n; i++)
            z[i] = top[i];
    }
}

static Py_ssize_t planes_len(Py_ssize_t count, int width)
{
    return (width == 2 ? count : 0) + (count + 7) / 8 * 8;
}

static int check_layout(int bits, int big_endian, Py_ssize_t period, Py_ssize_t stride)
{
    if (!group_bytes(bits) || (big_endian && bits != 16) || period < 1 || period > 255
        || stride < 0 || stride > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "no predictor for this layout");
        return -1;
    }
    return 0;
}

/* Scratch space: the words of n samples' top bytes, then `arrays` arrays of n samples (at
   `scratch + (n + 7) / 8`, n apart). NULL, with MemoryError set, if there is none. */
static uint64_t *scratch(Py_ssize_t n, int arrays)
{
    const size_t groups = ((size_t)n + 7) / 8;
    uint64_t *w = PyMem_RawMalloc(8 * groups + 2 * (size_t)arrays * (size_t)n + 1);
    if (w == NULL)
        PyErr_NoMemory();
    return w;
}

static PyObject *py_planes(PyObject *self, PyObject *args)
{
    Py_buffer body;
    int bits, big_endian;
    Py_ssize_t period, stride;
    if (!PyArg_ParseTuple(args, "y*ipnn", &body, &bits, &big_endian, &period, &stride))
        return NULL;
    PyObject *result = NULL;
    uint64_t *w = NULL;
    uint16_t *x, *z;
    if (check_layout(bits, big_endian, period, stride) < 0)
        goto done;
    if (body.len % group_bytes(bits)) {
        PyErr_SetString(PyExc_ValueError, "the body is not whole groups of samples");
        goto done;
    }
    const Py_ssize_t n = body.len / group_bytes(bits) * group_samples(bits);
    const int width = bits == 8 ? 1 : 2;
    if (n > PY_SSIZE_T_MAX / 8) {  /* (the scratch space's size would overflow) */
        PyErr_NoMemory();
        goto done;
    }
    if ((w = scratch(n, 2)) == NULL)
        goto done;
    x = (uint16_t *)(w + (n + 7) / 8);
    z = x + n;
    if ((result = PyBytes_FromStringAndSize(NULL, planes_len(n, width))) == NULL)
        goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    load(body.buf, n, bits, big_endian, x);
    residuals(x, n, width, period, stride, z);
    to_planes(z, n, width, out, w);
    Py_END_ALLOW_THREADS
done:
    PyMem_RawFree(w);
    PyBuffer_Release(&body);
    return result;
}

static PyObject *py_samples(PyObject *self, PyObject *args)
{
    Py_buffer planes;
    Py_ssize_t count, period, stride;
    int bits, big_endian;
    if (!PyArg_ParseTuple(args, "y*nipnn", &planes, &count, &bits, &big_endian, &period,
                          &stride))
        return NULL;
    PyObject *result = NULL;
    uint64_t *w = NULL;
    uint16_t *z;
    if (check_layout(bits, big_endian, period, stride) < 0)
        goto done;
    const int width = bits == 8 ? 1 : 2;
    if (count < 0 || count > PY_SSIZE_T_MAX / 8 || count % group_samples(bits)
        || planes.len != planes_len(count, width)) {
        PyErr_SetString(PyExc_ValueError, "the planes do not hold that many samples");
        goto done;
    }
    if ((w = scratch(count, 1)) == NULL)
        goto done;
    z = (uint16_t *)(w + (count + 7) / 8);
    result = PyBytes_FromStringAndSize(NULL, count / group_samples(bits) * group_bytes(bits));
    if (result == NULL)
        goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    from_planes(planes.buf, count, width, z, w);
    integrate(z, count, width, period, stride);
    store(z, count, bits, big_endian, out);
    Py_END_ALLOW_THREADS
done:
    PyMem_RawFree(w);
    PyBuffer_Release(&planes);
    return result;
}

static PyMethodDef methods[] = {
    {"planes", py_planes, METH_VARARGS,
     "planes(body, bits, big_endian, period, stride) -> bytes\n\n"
     "The zigzagged residuals of the samples in `body` (whole groups of samples of `bits`: 8,\n"
     "16, or 10, 12, 14 packed) as the format's planes: for samples wider than a byte the low\n"
     "bytes, then 8 bit planes of the top bytes."},
    {"samples", py_samples, METH_VARARGS,
     "samples(planes, count, bits, big_endian, period, stride) -> bytes\n\n"
     "The inverse of planes(): the body of `count` samples."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_predictor",
                                    "The sample predictor's residual planes, in C.", -1, methods};

PyMODINIT_FUNC PyInit__predictor(void)
{
    return PyModule_Create(&module);
}
