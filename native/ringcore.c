/* ringcore: the hot path of mpipeline's ring (try_put, try_get) in C.
 *
 * A measured study for issue 16, item 3 (see bench/RESULTS.md, "A native ring
 * core?"): it is not wired into mpipeline.ring. It works on the very same
 * segment layout as mpipeline/ring/_layout.py, so a C producer and a Python
 * consumer (or the other way round) share one ring:
 *
 *   header: 32 little-endian u64 slots (see _layout.py for which is which);
 *   record: [u32 length][u32 xxh3_64(payload) & 0xFFFFFFFF][payload][pad to 8];
 *   a length of 0xFFFFFFFF is a wrap marker: the record starts at offset 0.
 *
 * Memory ordering: the payload is written before the write position, which is
 * one aligned 8-byte release store; the consumer loads it with an acquire load
 * before reading the bytes. After publishing, each side issues a full fence
 * (the Python ring's threading.Lock round trip) before it reads the other
 * side's wait sequence, so a sleeper and a publisher never miss each other.
 * Doorbells stay in Python: when the peer is asleep the core calls ``bell``.
 *
 * Checksums: with -DRINGCORE_XXH3 and xxhash.h on the include path, xxh3 is
 * inlined; otherwise the core calls the xxhash package's xxh3_64_intdigest,
 * which is what the Python ring calls too.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ringcore assumes a little-endian host, as the segment layout does"
#endif

#ifdef RINGCORE_XXH3
#define XXH_INLINE_ALL
#include "xxhash.h"
#endif

#ifndef RINGCORE_NAME
#define RINGCORE_NAME "ringcore"
#endif

#define HEADER_SIZE 256
#define FLAG_CHECKSUM 1
#define WRAP 0xFFFFFFFFu
enum {
    S_VERSION = 1, S_CAPACITY = 2, S_MAX_RECORD = 3,
    S_WRITE = 8, S_RECORDS_IN = 9, S_BYTES_IN = 10, S_HIGH_WATER = 11, S_FULL = 12,
    S_PRODUCER_WAIT = 15,
    S_READ = 16, S_RECORDS_OUT = 17, S_BYTES_OUT = 18, S_CORRUPT = 19,
    S_CONSUMER_WAIT = 23, S_POISONED = 24,
};

static PyObject *RecordTooLarge, *RingCorrupted, *RingPoisoned, *xxh3_fn;

typedef struct {
    PyObject_HEAD
    Py_buffer mem;           /* the whole segment, held for the object's life */
    int held;                /* mem is held (released at close, or at the last view's end) */
    int closed;
    Py_ssize_t exports;      /* views alive: the mapping stays held while any is */
    uint64_t *q;             /* header slots */
    unsigned char *data;     /* the data area */
    uint64_t cap, max_record;
    int checksums;
    PyObject *name, *bell, *poison;
    /* producer */
    uint64_t wpos, rcache, nin, bin, hwm, full, rung;
    /* consumer */
    uint64_t rpos, rnext, wcache, nout, bout, corrupt;
    const unsigned char *cur; /* the record the next export hands out */
    Py_ssize_t curlen;
} Core;

static inline uint64_t load_acq(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint64_t load(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

/* xxh3_64 & 0xFFFFFFFF of ``len`` bytes at ``p`` (``obj`` exposes them); -1 on error. */
static int64_t checksum(const void *p, Py_ssize_t len, PyObject *obj) {
#ifdef RINGCORE_XXH3
    (void)obj;
    return (int64_t)(XXH3_64bits(p, (size_t)len) & 0xFFFFFFFFu);
#else
    (void)p; (void)len;
    PyObject *r = PyObject_CallOneArg(xxh3_fn, obj);
    if (r == NULL) return -1;
    uint64_t v = PyLong_AsUnsignedLongLongMask(r);
    Py_DECREF(r);
    if (v == (uint64_t)-1 && PyErr_Occurred()) return -1;
    return (int64_t)(v & 0xFFFFFFFFu);
#endif
}

static int ring_bell(Core *self) {
    if (self->bell == Py_None) return 0;
    PyObject *r = PyObject_CallNoArgs(self->bell);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static int core_init(Core *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"mem", "name", "bell", NULL};
    PyObject *mem, *name = NULL, *bell = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|UO:Core", kwlist, &mem, &name, &bell))
        return -1;
    if (self->held) {
        PyErr_SetString(PyExc_TypeError, "already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(mem, &self->mem, PyBUF_WRITABLE) < 0) return -1;
    self->held = 1;
    if (self->mem.len < HEADER_SIZE || ((uintptr_t)self->mem.buf & 7)) {
        PyErr_SetString(PyExc_ValueError, "not a ring segment (too small or unaligned)");
        return -1;
    }
    self->q = (uint64_t *)self->mem.buf;
    self->data = (unsigned char *)self->mem.buf + HEADER_SIZE;
    self->cap = self->q[S_CAPACITY];
    self->max_record = self->q[S_MAX_RECORD];
    if (self->cap < 64 || self->cap % 8 || (uint64_t)self->mem.len != HEADER_SIZE + self->cap) {
        PyErr_SetString(PyExc_ValueError, "segment size does not match its capacity");
        return -1;
    }
    self->checksums = (int)((self->q[S_VERSION] >> 32) & FLAG_CHECKSUM);
    if (name == NULL) name = PyUnicode_FromString("(native)");
    else Py_INCREF(name);
    Py_XSETREF(self->name, name);
    Py_INCREF(bell);
    Py_XSETREF(self->bell, bell);
    uint64_t *q = self->q;
    /* Producer and consumer state, as _claim_producer/_claim_consumer load it. */
    self->wpos = q[S_WRITE];
    self->rcache = q[S_READ];
    self->nin = q[S_RECORDS_IN]; self->bin = q[S_BYTES_IN];
    self->hwm = q[S_HIGH_WATER]; self->full = q[S_FULL];
    self->rpos = self->rnext = q[S_READ];
    self->wcache = q[S_WRITE];
    self->nout = q[S_RECORDS_OUT]; self->bout = q[S_BYTES_OUT]; self->corrupt = q[S_CORRUPT];
    return 0;
}

static void core_dealloc(Core *self) {
    if (self->held) PyBuffer_Release(&self->mem);
    Py_XDECREF(self->name);
    Py_XDECREF(self->bell);
    Py_XDECREF(self->poison);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *core_close(Core *self, PyObject *unused) {
    (void)unused;
    self->closed = 1;
    if (self->held && self->exports == 0) {
        PyBuffer_Release(&self->mem);
        self->held = 0;
    }
    Py_RETURN_NONE;
}

static int check_open(Core *self) {
    if (!self->closed && self->q != NULL) return 0;
    PyErr_SetString(PyExc_ValueError, "native ring core is closed or was never initialised");
    return -1;
}

/* Producer */

static uint64_t load_read(Core *self, int *err) {
    uint64_t r = load_acq(&self->q[S_READ]), w = self->wpos;
    if (r > w || w - r > self->cap || (r & 7)) {
        store(&self->q[S_POISONED], 1);
        PyErr_Format(RingPoisoned,
                     "ring %U is corrupted: read position %llu is inconsistent with write "
                     "position %llu", self->name, (unsigned long long)r, (unsigned long long)w);
        *err = 1;
    }
    return r;
}

static PyObject *core_try_put(Core *self, PyObject *buf) {
    Py_buffer b;
    int err = 0;
    if (check_open(self) < 0) return NULL;
    if (PyObject_GetBuffer(buf, &b, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t n = (uint64_t)b.len;
    if (n > self->max_record) {
        PyErr_Format(RecordTooLarge,
                     "record of %llu bytes exceeds ring %U's max_record of %llu bytes "
                     "(capacity %llu)", (unsigned long long)n, self->name,
                     (unsigned long long)self->max_record, (unsigned long long)self->cap);
        goto fail;
    }
    uint64_t cap = self->cap, w = self->wpos, off = w % cap;
    uint64_t rec = (n + 15) & ~(uint64_t)7, tail = cap - off;
    uint64_t need = rec <= tail ? rec : rec + tail;
    if (w + need - self->rcache > cap) {
        self->rcache = load_read(self, &err);
        if (err) goto fail;
        if (w + need - self->rcache > cap) {
            store(&self->q[S_FULL], ++self->full);
            PyBuffer_Release(&b);
            Py_RETURN_FALSE;
        }
    }
    uint32_t crc = 0;
    if (self->checksums) {
        int64_t c = checksum(b.buf, b.len, buf);
        if (c < 0) goto fail;
        crc = (uint32_t)c;
    }
    unsigned char *data = self->data;
    if (rec > tail) {
        uint32_t wrap[2] = {WRAP, 0};
        memcpy(data + off, wrap, 8);
        off = 0;
    }
    uint32_t hdr[2] = {(uint32_t)n, crc};
    memcpy(data + off, hdr, 8);
    memcpy(data + off + 8, b.buf, n);
    PyBuffer_Release(&b);
    self->nin += 1;
    self->bin += n;
    /* Publish: payload before position (release), counters, high water. */
    uint64_t *q = self->q;
    w += need;
    self->wpos = w;
    store_rel(&q[S_WRITE], w);
    store(&q[S_RECORDS_IN], self->nin);
    store(&q[S_BYTES_IN], self->bin);
    if (w - self->rcache > self->hwm) {
        self->rcache = load_read(self, &err);
        if (err) return NULL;
        uint64_t used = w - self->rcache;
        if (used > self->hwm) {
            self->hwm = used;
            store(&q[S_HIGH_WATER], used);
        }
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* store->load: position before the flag */
    uint64_t seq = load(&q[S_CONSUMER_WAIT]);
    if ((seq & 1) && seq != self->rung) {
        self->rung = seq;
        if (ring_bell(self) < 0) return NULL;
    }
    Py_RETURN_TRUE;
fail:
    PyBuffer_Release(&b);
    return NULL;
}

/* Consumer */

static PyObject *poison_ring(Core *self, PyObject *why) {
    if (why == NULL) return NULL;
    Py_XSETREF(self->poison, why);
    store(&self->q[S_CORRUPT], ++self->corrupt);
    store(&self->q[S_POISONED], 1);
    PyErr_Format(RingPoisoned, "ring %U is corrupted: %U", self->name, why);
    return NULL;
}

static int publish_read(Core *self, uint64_t r) {
    uint64_t *q = self->q;
    self->rpos = r;
    store_rel(&q[S_READ], r); /* release: reading is done before the space is reused */
    store(&q[S_RECORDS_OUT], self->nout);
    store(&q[S_BYTES_OUT], self->bout);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t seq = load(&q[S_PRODUCER_WAIT]);
    if ((seq & 1) && seq != self->rung) {
        self->rung = seq;
        return ring_bell(self);
    }
    return 0;
}

static PyObject *core_try_get(Core *self, PyObject *unused) {
    (void)unused;
    if (check_open(self) < 0) return NULL;
    uint64_t *q = self->q;
    uint64_t r = self->rnext;
    if (r != self->rpos && publish_read(self, r) < 0) return NULL;
    if (self->poison == NULL && load(&q[S_POISONED]))
        self->poison = PyUnicode_FromString("the supervisor marked this ring poisoned");
    if (r == self->wcache) {
        uint64_t w = load_acq(&q[S_WRITE]); /* acquire: position before payload */
        if (w < r || w - r > self->cap || (w & 7))
            return poison_ring(self, PyUnicode_FromFormat(
                "write position %llu is inconsistent with read position %llu",
                (unsigned long long)w, (unsigned long long)r));
        self->wcache = w;
        if (r == w) Py_RETURN_NONE;
    }
    if (self->poison != NULL) {
        PyErr_Format(RingPoisoned, "ring %U is poisoned: %U", self->name, self->poison);
        return NULL;
    }
    uint64_t cap = self->cap, off = r % cap;
    uint32_t hdr[2];
    memcpy(hdr, self->data + off, 8);
    if (hdr[0] == WRAP) {
        r += cap - off;
        off = 0;
        memcpy(hdr, self->data, 8);
    }
    uint64_t n = hdr[0];
    if (n > self->max_record)
        return poison_ring(self, PyUnicode_FromFormat(
            "record length %llu at position %llu exceeds max_record",
            (unsigned long long)n, (unsigned long long)r));
    uint64_t end = r + ((n + 15) & ~(uint64_t)7);
    if (end > self->wcache)
        return poison_ring(self, PyUnicode_FromFormat(
            "record at position %llu runs past the write position", (unsigned long long)r));
    self->rnext = end;
    self->nout += 1;
    self->bout += n;
    self->cur = self->data + off + 8;
    self->curlen = (Py_ssize_t)n;
    PyObject *view = PyMemoryView_FromObject((PyObject *)self);
    if (view == NULL || !self->checksums) return view;
    int64_t c = checksum(self->cur, self->curlen, view);
    if (c < 0) {
        Py_DECREF(view);
        return NULL;
    }
    if ((uint32_t)c == hdr[1]) return view;
    store(&q[S_CORRUPT], ++self->corrupt);
    PyErr_Format(RingCorrupted,
                 "checksum mismatch in ring %U at position %llu (%zd bytes); the record was "
                 "skipped", self->name, (unsigned long long)r, self->curlen);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *head = PyBytes_FromStringAndSize((const char *)self->cur,
                                               self->curlen < 256 ? self->curlen : 256);
    if (head != NULL) {
        PyObject_SetAttrString(value, "record", head);
        Py_DECREF(head);
    }
    PyErr_Restore(type, value, tb);
    Py_DECREF(view);
    return NULL;
}

/* Each get's view exports the record the get just parsed, read-only; the view
 * holds this object, which holds the mapping, so the bytes outlive a close. */
static int core_getbuffer(Core *self, Py_buffer *view, int flags) {
    if (self->cur == NULL) {
        PyErr_SetString(PyExc_BufferError, "no record to export");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->cur, self->curlen, 1, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void core_releasebuffer(Core *self, Py_buffer *view) {
    (void)view;
    if (--self->exports == 0 && self->closed && self->held) {
        PyBuffer_Release(&self->mem);
        self->held = 0;
    }
}

static PyBufferProcs core_as_buffer = {(getbufferproc)core_getbuffer,
                                       (releasebufferproc)core_releasebuffer};

static PyMethodDef core_methods[] = {
    {"try_put", (PyCFunction)core_try_put, METH_O,
     "Append one record if it fits now: True, or False when full; never blocks."},
    {"try_get", (PyCFunction)core_try_get, METH_NOARGS,
     "Take the next record (a read-only view valid until the next get) or None."},
    {"close", (PyCFunction)core_close, METH_NOARGS, "Let go of the mapping."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = RINGCORE_NAME ".Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Core(mem, name=None, bell=None): one side of a ring segment, in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_as_buffer = &core_as_buffer,
};

static struct PyModuleDef ringcore_module = {
    PyModuleDef_HEAD_INIT, RINGCORE_NAME,
    "The ring's try_put/try_get in C, on mpipeline's segment layout (a study).", -1, NULL,
};

PyMODINIT_FUNC PyInit_ringcore(void) {
    PyObject *errors = PyImport_ImportModule("mpipeline.errors");
    if (errors == NULL) return NULL;
    RecordTooLarge = PyObject_GetAttrString(errors, "RecordTooLarge");
    RingCorrupted = PyObject_GetAttrString(errors, "RingCorrupted");
    RingPoisoned = PyObject_GetAttrString(errors, "RingPoisoned");
    Py_DECREF(errors);
    if (!RecordTooLarge || !RingCorrupted || !RingPoisoned) return NULL;
    PyObject *xxh = PyImport_ImportModule("xxhash");
    if (xxh == NULL) return NULL;
    xxh3_fn = PyObject_GetAttrString(xxh, "xxh3_64_intdigest");
    Py_DECREF(xxh);
    if (xxh3_fn == NULL) return NULL;
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&ringcore_module);
    if (m == NULL) return NULL;
#ifdef RINGCORE_XXH3
    if (PyModule_AddIntConstant(m, "INLINE_XXH3", 1) < 0) return NULL;
#endif
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) return NULL;
    return m;
}
