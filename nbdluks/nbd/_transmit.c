/* The transmission phase's common case in C: a run of READ requests at the
 * start of what a client sent, decoded, read (from the page cache, then
 * AES-XTS through EVP for a LUKS volume) and answered into one reply buffer
 * in one call, with the GIL released for the I/O. Per request this is tens
 * of microseconds less Python than the general path (nbd/fastpath.py).
 *
 * It only ever takes what it is sure of: a READ whose flags, range and
 * alignment are valid and which the device may serve inline. At anything
 * else (another command, a bad header, a request too large, a failed read,
 * the end of the data) it stops and says how far it got; the caller's
 * Python decoder takes the rest, and is the reference for every rule.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#include "../_c/evpxts.h"

#define REQUEST_SIZE 28
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define CMD_READ 0
#define FLAG_DF 0x4
#define CHUNK_FLAG_DONE 0x1
#define CHUNK_OFFSET_DATA 1
#define SIMPLE_HEADER 16
#define DATA_CHUNK_HEADER 28 /* chunk header 20 + offset 8 */
#define MAX_RUN 256          /* requests per call */
#define SENDFILE_MIN (64 * 1024) /* shorter replies are copied: cheaper than a splice */
#define POLL_CHUNK (64 * 1024)   /* most bytes one poll() takes */

#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct cachestat_range { uint64_t off, len; };
struct cachestat { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };

typedef struct {
    PyObject_HEAD
    int fd;
    uint64_t base;     /* where the device's byte 0 is in fd */
    uint64_t size;     /* the device's size */
    uint32_t align;    /* offsets and lengths must be multiples of it */
    uint32_t max_length; /* the longest read taken ... */
    uint32_t max_cached; /* ... or, while the kernel can say, served from memory */
    int nowait;          /* preadv2(RWF_NOWAIT) works here */
    uint32_t sparse_min; /* structured reads without DF this long or longer: not here */
    uint32_t flags_ok;   /* the READ flags this connection may send */
    int structured;
    /* decryption; ctx NULL: the bytes are sent as read */
    evp_init_fn init;
    evp_update_fn update;
    void *ctx;
    int iv_mode;
    uint64_t iv_first; /* IV of the device's first unit */
    uint64_t iv_step;  /* added per unit */
    uint32_t unit;     /* bytes per data unit (the sector size) */
    PyObject *keep;    /* what owns fd and ctx: kept alive while this is */
    int sock;          /* the client's socket, for send(); -1: none */
    int splice;        /* cachestat(2) works: long replies may go by sendfile */
    long page;
} Reader;

static inline uint16_t be16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t be64(const unsigned char *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static inline void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static inline void put64(unsigned char *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

typedef struct {
    const unsigned char *handle; /* 8 bytes, echoed as they came */
    uint64_t offset;
    uint32_t length;
} Read;

/* Whether this reader takes the request header at r; if so, fills *out. */
static int takes(const Reader *self, const unsigned char *r, Read *out)
{
    if (be32(r) != REQUEST_MAGIC || be16(r + 6) != CMD_READ)
        return 0;
    uint32_t flags = be16(r + 4);
    uint64_t offset = be64(r + 16);
    uint32_t length = be32(r + 24);
    if (flags & ~self->flags_ok || length == 0
            || length > (self->nowait ? self->max_cached : self->max_length)
            || offset > self->size || length > self->size - offset
            || offset % self->align || length % self->align)
        return 0;
    if (self->structured && self->sparse_min && !(flags & FLAG_DF) && length >= self->sparse_min) {
        /* A reply that may skip holes: taken when there is none in range
         * (zeroes as data would be right too, only longer). */
        off_t hole = lseek(self->fd, (off_t)(self->base + offset), SEEK_HOLE);
        if (hole < 0 || (uint64_t)hole < self->base + offset + length)
            return 0;
    }
    out->handle = r + 8;
    out->offset = offset;
    out->length = length;
    return 1;
}

/* Reads are taken on the event loop only when they cannot wait for a disk:
 * with RWF_NOWAIT the kernel answers from its page cache or says EAGAIN,
 * and the request goes to the general path (a worker thread). Where it
 * cannot tell (EOPNOTSUPP), only reads of up to max_length are taken. */
static int read_all(Reader *self, unsigned char *p, size_t n, uint64_t at, int may_wait)
{
    while (n) {
        struct iovec iov = {p, n};
        ssize_t got = self->nowait && !may_wait
                          ? preadv2(self->fd, &iov, 1, (off_t)at, RWF_NOWAIT)
                          : pread(self->fd, p, n, (off_t)at);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (self->nowait && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) {
                self->nowait = 0;
                return -1; /* possibly longer than max_length: the general path */
            }
            return -1;
        }
        if (got == 0)
            return -1; /* the file shrank: the general path reports it */
        p += got;
        n -= (size_t)got;
        at += (uint64_t)got;
    }
    return 0;
}

/* A successful READ's reply header at o; its size. */
static size_t write_header(const Reader *self, const Read *rq, unsigned char *o)
{
    if (self->structured) {
        put32(o, STRUCTURED_REPLY_MAGIC);
        o[4] = 0;
        o[5] = CHUNK_FLAG_DONE;
        o[6] = 0;
        o[7] = CHUNK_OFFSET_DATA;
        memcpy(o + 8, rq->handle, 8);
        put32(o + 16, rq->length + 8);
        put64(o + 20, rq->offset);
        return DATA_CHUNK_HEADER;
    }
    put32(o, SIMPLE_REPLY_MAGIC);
    put32(o + 4, 0);
    memcpy(o + 8, rq->handle, 8);
    return SIMPLE_HEADER;
}

/* One reply (header and data) at o; 0: written, -1: the read failed. */
static int answer(Reader *self, const Read *rq, unsigned char *o)
{
    unsigned char *data = o + write_header(self, rq, o);
    if (read_all(self, data, rq->length, self->base + rq->offset, 0) < 0)
        return -1;
    if (self->ctx) {
        uint64_t index = rq->offset / self->unit;
        if (!evpxts_units(self->init, self->update, self->ctx, data, rq->length / self->unit,
                          (int)self->unit, self->iv_first + index * self->iv_step,
                          self->iv_step, self->iv_mode, NULL))
            return -1;
    }
    return 0;
}

/* The READs this reader takes from p[pos:len], in order, while their
 * replies stay within `limit` bytes (one is always taken): their count, the
 * reply bytes in *total. */
static int scan(const Reader *self, const unsigned char *p, Py_ssize_t len, Py_ssize_t pos,
                Py_ssize_t limit, Read *run, size_t *total)
{
    size_t header = self->structured ? DATA_CHUNK_HEADER : SIMPLE_HEADER;
    int count = 0;
    *total = 0;
    for (Py_ssize_t at = pos; self->fd >= 0 && count < MAX_RUN && len - at >= REQUEST_SIZE
                              && takes(self, p + at, &run[count]); at += REQUEST_SIZE) {
        size_t need = header + run[count].length;
        if (count && *total + need > (size_t)limit)
            break;
        *total += need;
        count++;
    }
    return count;
}

/* serve(data, pos, limit) -> (end, replies, count, nbytes)
 * Answers the READs this reader takes from data[pos:], in order, until one
 * it does not take or until the replies would pass `limit` bytes (one is
 * always taken). `end`: where the first request not answered starts;
 * `replies`: their bytes (None when none); `nbytes`: data bytes read. */
static PyObject *Reader_serve(Reader *self, PyObject *args)
{
    Py_buffer in;
    Py_ssize_t pos, limit;
    Read run[MAX_RUN];
    if (!PyArg_ParseTuple(args, "y*nn", &in, &pos, &limit))
        return NULL;
    if (pos < 0 || pos > in.len) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "position outside the data");
        return NULL;
    }
    size_t total = 0;
    int count = scan(self, in.buf, in.len, pos, limit, run, &total);
    if (count == 0) {
        PyBuffer_Release(&in);
        return Py_BuildValue("nOii", pos, Py_None, 0, 0);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    size_t header = self->structured ? DATA_CHUNK_HEADER : SIMPLE_HEADER;
    size_t done = 0;
    uint64_t nbytes = 0;
    int served = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; served < count; served++) {
        if (answer(self, &run[served], o + done) < 0)
            break;
        done += header + run[served].length;
        nbytes += run[served].length;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    if (served == 0) {
        Py_DECREF(out);
        return Py_BuildValue("nOii", pos, Py_None, 0, 0);
    }
    if (done < total && _PyBytes_Resize(&out, (Py_ssize_t)done) < 0)
        return NULL;
    PyObject *res = Py_BuildValue("nNiK", pos + (Py_ssize_t)served * REQUEST_SIZE, out, served,
                                  (unsigned long long)nbytes);
    return res;
}

/* Whether [at, at+n) of fd is all in the page cache: 1, 0; -1: cannot tell. */
static int cached(Reader *self, uint64_t at, uint64_t n)
{
    struct cachestat_range r = {at, n};
    struct cachestat cs;
    if (syscall(__NR_cachestat, self->fd, &r, &cs, 0) < 0)
        return -1;
    return cs.nr_cache >= (at + n - 1) / (uint64_t)self->page - at / (uint64_t)self->page + 1;
}

/* What send() does without the GIL. The bytes not written when the socket
 * filled up (the rest of one reply, or of the copied replies) are left in
 * *rest for the caller's transport, which must send them before anything
 * else; the run stops there. */
typedef struct {
    unsigned char *rest;
    size_t rest_len;
    int served;
    uint64_t nbytes;
    int err; /* errno of a failed write: the stream is broken */
} Sent;

/* Write p[0:n] without blocking; what was not written goes to *st (copied). */
static int put_or_keep(Reader *self, const unsigned char *p, size_t n, int more, Sent *st)
{
    size_t done = 0;
    while (done < n) {
        ssize_t w = send(self->sock, p + done, n - done,
                         MSG_DONTWAIT | MSG_NOSIGNAL | (more ? MSG_MORE : 0));
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (w < 0) {
            st->err = errno;
            return -1;
        }
        done += (size_t)w;
    }
    if (done == n)
        return 0;
    st->rest = malloc(n - done);
    if (st->rest == NULL) {
        st->err = ENOMEM;
        return -1;
    }
    memcpy(st->rest, p + done, n - done);
    st->rest_len = n - done;
    return 1; /* full: stop */
}

/* A long reply: its header, then its data from the page cache by sendfile.
 * 0: sent, 1: the socket filled (the rest is in *st), -1: broken. */
static int splice_reply(Reader *self, const Read *rq, Sent *st)
{
    unsigned char h[DATA_CHUNK_HEADER];
    size_t hn = self->structured ? DATA_CHUNK_HEADER : SIMPLE_HEADER;
    write_header(self, rq, h);
    int r = put_or_keep(self, h, hn, 1, st);
    off_t at = (off_t)(self->base + rq->offset);
    size_t left = rq->length;
    if (r == 0) {
        while (left) {
            ssize_t w = sendfile(self->sock, self->fd, &at, left);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            if (w <= 0) { /* 0: the file shrank under a reply half sent */
                st->err = w < 0 ? errno : EIO;
                return -1;
            }
            left -= (size_t)w;
        }
        if (!left)
            return 0;
    } else if (r < 0) {
        return -1;
    }
    /* The socket is full: the rest of this reply (cached, said cachestat;
     * half sent, it must be read whatever happens) is left for the transport. */
    unsigned char *rest = realloc(st->rest, st->rest_len + left);
    if (rest == NULL || read_all(self, rest + st->rest_len, left, (uint64_t)at, 1) < 0) {
        st->rest = rest ? rest : st->rest;
        st->err = EIO;
        return -1;
    }
    st->rest = rest;
    st->rest_len += left;
    return 1;
}

/* The run for send(): short replies copied into `buf` (sent when full or
 * before a long one), long ones spliced. */
static void send_run(Reader *self, const Read *run, int count, unsigned char *buf, Sent *st)
{
    size_t header = self->structured ? DATA_CHUNK_HEADER : SIMPLE_HEADER;
    size_t used = 0;
    int i, r = 0;
    for (i = 0; i < count && r == 0; i++) {
        const Read *rq = &run[i];
        int splice = self->splice && !self->ctx && rq->length >= SENDFILE_MIN;
        if (splice) {
            int c = cached(self, self->base + rq->offset, rq->length);
            if (c < 0)
                self->splice = splice = 0;
            else if (c == 0)
                break; /* the general path reads it on a thread */
        }
        if (splice) {
            if (used && (r = put_or_keep(self, buf, used, 1, st)) != 0)
                break;
            used = 0;
            r = splice_reply(self, rq, st);
            if (r >= 0) {
                st->served++;
                st->nbytes += rq->length;
            }
            continue;
        }
        if (answer(self, rq, buf + used) < 0)
            break;
        used += header + rq->length;
        st->served++;
        st->nbytes += rq->length;
    }
    if (used && r == 0)
        put_or_keep(self, buf, used, 0, st);
}

/* send(data, pos, limit) -> (end, rest, count, nbytes)
 * serve(), but the replies are written to the client's socket here (long
 * ones spliced from the page cache: one copy fewer), for a connection whose
 * transport has nothing queued. `rest`: bytes the socket did not take, for
 * the transport to send before anything else (None: all sent). OSError: the
 * socket broke. */
static PyObject *Reader_send(Reader *self, PyObject *args)
{
    Py_buffer in;
    Py_ssize_t pos, limit;
    Read run[MAX_RUN];
    if (!PyArg_ParseTuple(args, "y*nn", &in, &pos, &limit))
        return NULL;
    if (pos < 0 || pos > in.len || self->sock < 0) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "position outside the data, or no socket");
        return NULL;
    }
    size_t total = 0;
    int count = scan(self, in.buf, in.len, pos, limit, run, &total);
    Sent st = {0};
    /* Room for every reply, though long ones are mostly spliced: pages of
     * it never written are never touched. */
    unsigned char *buf = count ? malloc(total) : NULL;
    if (buf != NULL) {
        Py_BEGIN_ALLOW_THREADS
        send_run(self, run, count, buf, &st);
        Py_END_ALLOW_THREADS
    }
    free(buf);
    PyBuffer_Release(&in);
    if (st.err) {
        free(st.rest);
        errno = st.err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *rest = Py_None;
    Py_INCREF(rest);
    if (st.rest_len) {
        Py_DECREF(rest);
        rest = PyBytes_FromStringAndSize((const char *)st.rest, (Py_ssize_t)st.rest_len);
    }
    free(st.rest);
    if (rest == NULL)
        return NULL;
    return Py_BuildValue("nNiK", pos + (Py_ssize_t)st.served * REQUEST_SIZE, rest, st.served,
                         (unsigned long long)st.nbytes);
}

static PyObject *Reader_close(Reader *self, PyObject *unused)
{
    self->fd = -1;
    self->sock = -1;
    self->ctx = NULL;
    Py_CLEAR(self->keep);
    Py_RETURN_NONE;
}

/* Reader(fd, base, size, align, max_length, max_cached, sparse_min, flags_ok,
 *        structured, keep, init, update, ctx, iv_mode, iv_first, iv_step, unit, sock) */
static int Reader_init(Reader *self, PyObject *args, PyObject *kwds)
{
    int fd, structured, iv_mode, sock;
    unsigned long long base, size, init, update, ctx, iv_first, iv_step;
    unsigned int align, max_length, max_cached, sparse_min, flags_ok, unit;
    PyObject *keep;
    if (!PyArg_ParseTuple(args, "iKKIIIIIpOKKKiKKIi", &fd, &base, &size, &align, &max_length,
                          &max_cached, &sparse_min, &flags_ok, &structured, &keep, &init,
                          &update, &ctx, &iv_mode, &iv_first, &iv_step, &unit, &sock))
        return -1;
    if (fd < 0 || align == 0 || max_length == 0 || base + size < base) {
        PyErr_SetString(PyExc_ValueError, "a descriptor, an alignment and a length are needed");
        return -1;
    }
    if (ctx && (!init || !update || unit == 0 || unit % 16 || unit > INT32_MAX
                || align % unit || iv_mode < IV_PLAIN64 || iv_mode > IV_PLAIN64BE)) {
        PyErr_SetString(PyExc_ValueError, "whole units and a plain IV generator are needed");
        return -1;
    }
    self->fd = fd;
    self->base = base;
    self->size = size;
    self->align = align;
    self->max_length = max_length;
    self->max_cached = max_cached > max_length ? max_cached : max_length;
    self->nowait = 1;
    self->sock = sock;
    self->splice = 1;
    self->page = sysconf(_SC_PAGESIZE);
    self->sparse_min = sparse_min;
    self->flags_ok = flags_ok;
    self->structured = structured;
    self->init = (evp_init_fn)(uintptr_t)init;
    self->update = (evp_update_fn)(uintptr_t)update;
    self->ctx = (void *)(uintptr_t)ctx;
    self->iv_mode = iv_mode;
    self->iv_first = iv_first;
    self->iv_step = iv_step;
    self->unit = unit;
    Py_INCREF(keep);
    Py_XSETREF(self->keep, keep);
    return 0;
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Reader *self = (Reader *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->fd = self->sock = -1; /* serves nothing until __init__ has run */
    return (PyObject *)self;
}

static int Reader_traverse(Reader *self, visitproc visit, void *arg)
{
    Py_VISIT(self->keep);
    return 0;
}

static int Reader_clear(Reader *self)
{
    Py_CLEAR(self->keep);
    return 0;
}

static void Reader_dealloc(Reader *self)
{
    PyObject_GC_UnTrack(self);
    Reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* poll(sock, epfd, budget_ns) -> bytes | b"" | None
 * The client's next bytes, awaited on the CPU for up to budget_ns with the
 * GIL released (nbd/poll.py says why). b"": stopped early, because another
 * socket in the epoll set `epfd` (-1: none) has bytes for the event loop,
 * or this one is at its end or broke (the event loop sees that too). None:
 * nothing came. */
static PyObject *transmit_poll(PyObject *mod, PyObject *args)
{
    int sock, epfd;
    unsigned long long budget;
    unsigned char buf[POLL_CHUNK];
    if (!PyArg_ParseTuple(args, "iiK", &sock, &epfd, &budget))
        return NULL;
    ssize_t n = -1;
    int early = 0; /* stopped for the event loop */
    Py_BEGIN_ALLOW_THREADS
    uint64_t end = now_ns() + budget;
    for (;;) {
        n = recv(sock, buf, sizeof buf, MSG_DONTWAIT);
        if (n >= 0)
            break;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            early = 1; /* the event loop reads the end (or the error) */
            break;
        }
        if (epfd >= 0) {
            struct epoll_event ev[8];
            int k = epoll_wait(epfd, ev, 8, 0);
            for (int i = 0; i < k; i++)
                early |= ev[i].data.fd != sock;
            if (early)
                break;
        }
        if (now_ns() >= end)
            break;
    }
    Py_END_ALLOW_THREADS
    if (n > 0)
        return PyBytes_FromStringAndSize((const char *)buf, n);
    if (n == 0 || early)
        return PyBytes_FromStringAndSize(NULL, 0);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"poll", (PyCFunction)transmit_poll, METH_VARARGS,
     "poll(sock, epfd, budget_ns) -> bytes | b'' | None"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Reader_methods[] = {
    {"serve", (PyCFunction)Reader_serve, METH_VARARGS,
     "serve(data, pos, limit) -> (end, replies, count, nbytes)"},
    {"send", (PyCFunction)Reader_send, METH_VARARGS,
     "send(data, pos, limit) -> (end, rest, count, nbytes)"},
    {"close", (PyCFunction)Reader_close, METH_NOARGS, "Serve nothing from now on."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nbdluks.nbd._transmit.Reader",
    .tp_doc = "Answers runs of small READs of one device for one connection.",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Reader_new,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_methods = Reader_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_transmit", "Runs of small READs answered in C.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__transmit(void)
{
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
