/*
 * Hextile (RFB encoding 5) in one pass over the pixels: rfb.encodings.hextile's C part.
 *
 * Why C: a full 1920x1080 update of high-colour pixels is 8100 raw tiles, and numpy needs a gather and a
 * copy per band (each a pass over 8 MB) where QEMU's encoder makes one; a text screen is ~1000 tiles of a
 * few colours, each needing a subrectangle search that costs milliseconds per tile in Python. Here each tile
 * is copied once into a small local buffer (so a framebuffer the guest is still drawing into cannot make one
 * pass disagree with the next), classified, and written straight into the caller's buffer (the encoder
 * worker's output memfd), so nothing is copied again.
 *
 * The bytes are exactly those of the Python reference (rfb/encodings/hextile_reference.py), tile by tile:
 *   - all pixels equal: a solid tile (one byte when the colour is the background carried over);
 *   - more than 16 colours: raw;
 *   - otherwise the most common colour (ties: the lowest pixel value) is the background, and the other
 *     colours are subrectangles: horizontal runs of one colour, merged downwards while the same run repeats
 *     in the next row; one foreground colour if the tile has two colours, else coloured subrectangles;
 *     raw instead when that is not smaller than raw or needs more than 255 subrectangles.
 * The background carries over solid and subrectangle tiles; the foreground over solid and one-foreground
 * tiles; a raw tile carries neither (the spec leaves them undefined after it).
 *
 * Pixels are 1, 2 or 4-byte items (a viewer's pixel format), compared as unsigned integers in machine order;
 * they are copied to the output as they are.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

enum {
    TILE = 16,
    RAW = 1,
    BACKGROUND_SPECIFIED = 2,
    FOREGROUND_SPECIFIED = 4,
    ANY_SUBRECTS = 8,
    SUBRECTS_COLOURED = 16,
    MAX_COLOURS = 16,
    MAX_SUBRECTS = 255,
    MAX_SIDE = 0xFFFF, /* RFB's 16-bit rectangle sizes */
};

/* The colours carried from one tile to the next. */
typedef struct {
    uint32_t bg, fg;
    int has_bg, has_fg;
} Carry;

/* A horizontal run of one palette index, [x0, x1), open from row y0 for h rows. */
typedef struct {
    uint8_t x0, x1, index, y0, h;
} Run;

static uint8_t *put_pixel(uint8_t *out, uint32_t value, int bpp)
{
    if (bpp == 4) {
        memcpy(out, &value, 4);
    } else if (bpp == 2) {
        uint16_t narrow = (uint16_t)value;
        memcpy(out, &narrow, 2);
    } else {
        *out = (uint8_t)value;
    }
    return out + bpp;
}

static uint8_t *put_run(uint8_t *out, const Run *run, const uint32_t *palette, int coloured, int bpp)
{
    if (coloured)
        out = put_pixel(out, palette[run->index], bpp);
    *out++ = (uint8_t)(run->x0 << 4 | run->y0);
    *out++ = (uint8_t)((run->x1 - run->x0 - 1) << 4 | (run->h - 1));
    return out;
}

static size_t raw_tile(const uint8_t *packed, size_t size, Carry *carry, uint8_t *out)
{
    out[0] = RAW;
    memcpy(out + 1, packed, size);
    carry->has_bg = carry->has_fg = 0;
    return 1 + size;
}

/* The subrectangles of a tile's palette indices (index 0 is the background, never a subrectangle), in the
 * reference's order: a run is written when it ends (the row below does not repeat it), runs ending on the
 * same row from left to right, and the runs still open after the last row last. Returns how many there are,
 * at most MAX_SUBRECTS + 1 (the caller then sends the tile raw). */
static int find_subrects(const uint8_t *indices, int tw, int th, Run *done)
{
    Run open[TILE], next[TILE];
    int n_open = 0, n_done = 0;
    for (int y = 0; y < th; y++) {
        const uint8_t *row = indices + y * tw;
        uint8_t continued[TILE] = {0};
        int n_next = 0, p = 0;
        for (int x = 0; x < tw;) {
            uint8_t index = row[x];
            int x0 = x;
            while (x < tw && row[x] == index)
                x++;
            if (index == 0)
                continue;
            Run run = {(uint8_t)x0, (uint8_t)x, index, (uint8_t)y, 1};
            while (p < n_open && open[p].x0 < x0)
                p++;
            if (p < n_open && open[p].x0 == x0 && open[p].x1 == x && open[p].index == index) {
                run.y0 = open[p].y0;
                run.h = (uint8_t)(open[p].h + 1);
                continued[p] = 1;
            }
            next[n_next++] = run;
        }
        for (int k = 0; k < n_open; k++) {
            if (!continued[k]) {
                if (n_done > MAX_SUBRECTS)
                    return n_done;
                done[n_done++] = open[k];
            }
        }
        memcpy(open, next, sizeof(Run) * (size_t)n_next);
        n_open = n_next;
    }
    for (int k = 0; k < n_open; k++) {
        if (n_done > MAX_SUBRECTS)
            return n_done;
        done[n_done++] = open[k];
    }
    return n_done;
}

/* One tile of tw x th pixels whose rows start `stride` bytes apart at `src`; returns the bytes written to
 * `out` (at most 1 + tw * th * bpp). */
static size_t encode_tile(const uint8_t *src, Py_ssize_t stride, int tw, int th, int bpp, Carry *carry,
                          uint8_t *out)
{
    uint32_t px[TILE * TILE];
    uint8_t narrow[TILE * TILE * 2];
    const int n = tw * th;
    const size_t row_bytes = (size_t)tw * (size_t)bpp, size = (size_t)n * (size_t)bpp;
    uint8_t *packed = bpp == 4 ? (uint8_t *)px : narrow;
    for (int y = 0; y < th; y++)
        memcpy(packed + (size_t)y * row_bytes, src + y * stride, row_bytes);
    if (bpp == 2) {
        for (int i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, narrow + 2 * i, 2);
            px[i] = v;
        }
    } else if (bpp == 1) {
        for (int i = 0; i < n; i++)
            px[i] = narrow[i];
    }

    const uint32_t first = px[0];
    int i = 1;
    while (i < n && px[i] == first)
        i++;
    if (i == n) { /* solid */
        if (carry->has_bg && carry->bg == first) {
            out[0] = 0;
            return 1;
        }
        out[0] = BACKGROUND_SPECIFIED;
        put_pixel(out + 1, first, bpp);
        carry->bg = first;
        carry->has_bg = 1;
        return 1 + (size_t)bpp;
    }

    /* The distinct colours in order of first appearance, and each pixel's position among them. */
    uint32_t seen[MAX_COLOURS];
    uint8_t slot[TILE * TILE];
    int n_colours = 1;
    seen[0] = first;
    memset(slot, 0, (size_t)i);
    uint32_t previous = first;
    uint8_t previous_slot = 0;
    for (; i < n; i++) {
        const uint32_t v = px[i];
        if (v != previous) {
            int k = 0;
            while (k < n_colours && seen[k] != v)
                k++;
            if (k == n_colours) {
                if (n_colours == MAX_COLOURS)
                    return raw_tile(packed, size, carry, out);
                seen[n_colours++] = v;
            }
            previous = v;
            previous_slot = (uint8_t)k;
        }
        slot[i] = previous_slot;
    }

    /* Palette in ascending pixel value; then the most common colour (the first of equals) swapped to 0. */
    uint8_t rank[MAX_COLOURS];
    uint32_t palette[MAX_COLOURS];
    int counts[MAX_COLOURS] = {0}, slot_counts[MAX_COLOURS] = {0};
    for (int k = 0; k < n_colours; k++) {
        int r = 0;
        for (int j = 0; j < n_colours; j++)
            r += seen[j] < seen[k];
        rank[k] = (uint8_t)r;
        palette[r] = seen[k];
    }
    for (int p = 0; p < n; p++)
        slot_counts[slot[p]]++;
    for (int k = 0; k < n_colours; k++)
        counts[rank[k]] = slot_counts[k];
    int top = 0;
    for (int r = 1; r < n_colours; r++)
        if (counts[r] > counts[top])
            top = r;
    uint8_t final_index[MAX_COLOURS];
    for (int k = 0; k < n_colours; k++)
        final_index[k] = rank[k] == top ? 0 : rank[k] == 0 ? (uint8_t)top : rank[k];
    const uint32_t top_colour = palette[top];
    palette[top] = palette[0];
    palette[0] = top_colour;
    uint8_t indices[TILE * TILE];
    for (int p = 0; p < n; p++)
        indices[p] = final_index[slot[p]];

    Run rects[MAX_SUBRECTS + 1];
    const int n_rects = find_subrects(indices, tw, th, rects);
    if (n_rects > MAX_SUBRECTS)
        return raw_tile(packed, size, carry, out);
    const int coloured = n_colours > 2;
    const int bg_specified = !(carry->has_bg && carry->bg == palette[0]);
    const int fg_specified = !coloured && !(carry->has_fg && carry->fg == palette[1]);
    const size_t encoded = 2 + (size_t)bpp * (size_t)(bg_specified + fg_specified)
                           + (size_t)n_rects * (size_t)(coloured ? 2 + bpp : 2);
    if (encoded >= 1 + size)
        return raw_tile(packed, size, carry, out);

    uint8_t *at = out;
    *at++ = (uint8_t)(ANY_SUBRECTS | (bg_specified ? BACKGROUND_SPECIFIED : 0)
                      | (fg_specified ? FOREGROUND_SPECIFIED : 0) | (coloured ? SUBRECTS_COLOURED : 0));
    if (bg_specified)
        at = put_pixel(at, palette[0], bpp);
    if (fg_specified)
        at = put_pixel(at, palette[1], bpp);
    *at++ = (uint8_t)n_rects;
    for (int k = 0; k < n_rects; k++)
        at = put_run(at, &rects[k], palette, coloured, bpp);
    carry->bg = palette[0];
    carry->has_bg = 1;
    if (coloured) {
        carry->has_fg = 0; /* what the reference does: no foreground is carried over coloured subrectangles */
    } else {
        carry->fg = palette[1];
        carry->has_fg = 1;
    }
    return (size_t)(at - out);
}

/* The most bytes a width x height rectangle can take: a raw tile is the largest any tile gets. */
static Py_ssize_t bound(Py_ssize_t width, Py_ssize_t height, Py_ssize_t bpp)
{
    const Py_ssize_t tiles = ((width + TILE - 1) / TILE) * ((height + TILE - 1) / TILE);
    return tiles + width * height * bpp;
}

static int valid_side(Py_ssize_t side)
{
    return side >= 0 && side <= MAX_SIDE;
}

PyDoc_STRVAR(max_size_doc,
"max_size(width, height, bytes_per_pixel, /) -> int\n\n"
"The most bytes the Hextile payload of a width x height rectangle can take: the room encode_into needs.");

static PyObject *max_size(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "max_size() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t values[3];
    for (int k = 0; k < 3; k++) {
        values[k] = PyLong_AsSsize_t(args[k]);
        if (values[k] == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!valid_side(values[0]) || !valid_side(values[1]) || (values[2] != 1 && values[2] != 2 && values[2] != 4)) {
        PyErr_Format(PyExc_ValueError, "no Hextile rectangle is %zdx%zd at %zd bytes per pixel", values[0],
                     values[1], values[2]);
        return NULL;
    }
    return PyLong_FromSsize_t(bound(values[0], values[1], values[2]));
}

PyDoc_STRVAR(encode_into_doc,
"encode_into(pixels, out, /) -> int\n\n"
"Writes the Hextile payload of a rectangle into out (a writable contiguous buffer of at least max_size\n"
"bytes) from its first byte; returns how many bytes it wrote. pixels is a 2-D buffer (height, width) of 1,\n"
"2 or 4-byte items, its items contiguous within a row, its rows at any positive distance (a numpy view of\n"
"a framebuffer). The GIL is released while encoding.");

static PyObject *encode_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "encode_into() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_buffer src, dst;
    if (PyObject_GetBuffer(args[0], &src, PyBUF_RECORDS_RO) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    PyObject *result = NULL;
    const Py_ssize_t bpp = src.itemsize;
    if (src.ndim != 2 || src.suboffsets != NULL) {
        PyErr_Format(PyExc_ValueError, "pixels must be a 2-D buffer (height, width), not %d-D", src.ndim);
        goto done;
    }
    const Py_ssize_t height = src.shape[0], width = src.shape[1];
    const Py_ssize_t row_stride = src.strides[0];
    if (bpp != 1 && bpp != 2 && bpp != 4) {
        PyErr_Format(PyExc_ValueError, "pixels of %zd bytes: Hextile here takes 1, 2 or 4", bpp);
        goto done;
    }
    if (!valid_side(width) || !valid_side(height)) {
        PyErr_Format(PyExc_ValueError, "a %zdx%zd rectangle does not fit RFB's 16-bit sizes", width, height);
        goto done;
    }
    if (width > 1 && src.strides[1] != bpp) {
        PyErr_SetString(PyExc_ValueError, "pixels within a row must be contiguous");
        goto done;
    }
    if (height > 1 && row_stride < width * bpp) {
        PyErr_SetString(PyExc_ValueError, "rows of pixels must follow each other (a positive stride)");
        goto done;
    }
    const Py_ssize_t needed = bound(width, height, bpp);
    if (dst.len < needed) {
        PyErr_Format(PyExc_ValueError, "output buffer of %zd bytes, a %zdx%zd Hextile rectangle may need %zd",
                     dst.len, width, height, needed);
        goto done;
    }
    size_t written = 0;
    Py_BEGIN_ALLOW_THREADS
    Carry carry = {0, 0, 0, 0};
    uint8_t *out = dst.buf;
    const uint8_t *base = src.buf;
    for (Py_ssize_t ty = 0; ty < height; ty += TILE) {
        const int th = (int)(height - ty < TILE ? height - ty : TILE);
        for (Py_ssize_t tx = 0; tx < width; tx += TILE) {
            const int tw = (int)(width - tx < TILE ? width - tx : TILE);
            written += encode_tile(base + ty * row_stride + tx * bpp, row_stride, tw, th, (int)bpp, &carry,
                                   out + written);
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSize_t(written);
done:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef methods[] = {
    {"encode_into", (PyCFunction)(void (*)(void))encode_into, METH_FASTCALL, encode_into_doc},
    {"max_size", (PyCFunction)(void (*)(void))max_size, METH_FASTCALL, max_size_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rfb.encodings._hextile",
    .m_doc = "Hextile encoding in C, one pass per tile (see rfb.encodings.hextile).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__hextile(void)
{
    return PyModuleDef_Init(&module_def);
}
