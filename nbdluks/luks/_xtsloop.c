/* The per-unit loop of AES-XTS through libcrypto's EVP, in C: one call per
 * request instead of two ctypes calls per data unit, with the GIL released.
 *
 * No OpenSSL headers or link: the caller (evp.py) passes the addresses of
 * EVP_CipherInit_ex and EVP_CipherUpdate it resolved with ctypes, and a
 * context it initialised with the key. IVs are made here for the plain IV
 * generators, or taken from a caller's array (essiv).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int (*init_fn)(void *ctx, const void *cipher, void *engine,
                       const unsigned char *key, const unsigned char *iv, int enc);
typedef int (*update_fn)(void *ctx, unsigned char *out, int *outl,
                         const unsigned char *in, int inl);

enum { IV_ARRAY = 0, IV_PLAIN64 = 1, IV_PLAIN = 2, IV_PLAIN64BE = 3 };

static void make_iv(unsigned char iv[16], int mode, uint64_t sector)
{
    memset(iv, 0, 16);
    switch (mode) {
    case IV_PLAIN64:
        for (int i = 0; i < 8; i++)
            iv[i] = (unsigned char)(sector >> (8 * i));
        break;
    case IV_PLAIN:
        for (int i = 0; i < 4; i++)
            iv[i] = (unsigned char)(sector >> (8 * i));
        break;
    case IV_PLAIN64BE:
        for (int i = 0; i < 8; i++)
            iv[15 - i] = (unsigned char)(sector >> (8 * i));
        break;
    }
}

/* crypt(init, update, ctx, buf, unit, first_sector, step, iv_mode, ivs) -> None
 * In place over whole `unit`-byte units of the writable buffer `buf`. */
static PyObject *xts_crypt(PyObject *self, PyObject *args)
{
    unsigned long long init_addr, update_addr, ctx_addr, first, step;
    Py_ssize_t unit;
    int mode;
    Py_buffer buf, ivs = {0};
    PyObject *ivs_obj;

    if (!PyArg_ParseTuple(args, "KKKw*nKKiO", &init_addr, &update_addr, &ctx_addr, &buf,
                          &unit, &first, &step, &mode, &ivs_obj))
        return NULL;
    Py_ssize_t count = unit > 0 ? buf.len / unit : 0;
    if (unit <= 0 || unit % 16 || unit > INT32_MAX || count * unit != buf.len
            || !init_addr || !update_addr || !ctx_addr || mode < 0 || mode > 3) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "whole 16-byte-multiple units and EVP functions needed");
        return NULL;
    }
    if (mode == IV_ARRAY) {
        if (PyObject_GetBuffer(ivs_obj, &ivs, PyBUF_C_CONTIGUOUS) < 0) {
            PyBuffer_Release(&buf);
            return NULL;
        }
        if (ivs.len != count * 16) {
            PyBuffer_Release(&ivs);
            PyBuffer_Release(&buf);
            PyErr_SetString(PyExc_ValueError, "one 16-byte IV per unit is needed");
            return NULL;
        }
    }
    init_fn init = (init_fn)(uintptr_t)init_addr;
    update_fn update = (update_fn)(uintptr_t)update_addr;
    void *ctx = (void *)(uintptr_t)ctx_addr;
    unsigned char *p = buf.buf;
    const unsigned char *ivp = ivs.buf;
    int ok = 1;

    Py_BEGIN_ALLOW_THREADS
    unsigned char iv[16];
    for (Py_ssize_t i = 0; i < count && ok; i++) {
        const unsigned char *this_iv = iv;
        if (mode == IV_ARRAY)
            this_iv = ivp + 16 * i;
        else
            make_iv(iv, mode, first + (uint64_t)i * step);
        int outl = 0;
        ok = init(ctx, NULL, NULL, NULL, this_iv, -1) == 1
             && update(ctx, p + i * unit, &outl, p + i * unit, (int)unit) == 1;
    }
    memset(iv, 0, sizeof(iv));
    Py_END_ALLOW_THREADS

    if (mode == IV_ARRAY)
        PyBuffer_Release(&ivs);
    PyBuffer_Release(&buf);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "OpenSSL XTS failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"crypt", xts_crypt, METH_VARARGS, "AES-XTS over whole units through EVP, in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_xtsloop", "The per-unit EVP loop of AES-XTS.", -1, methods,
};

PyMODINIT_FUNC PyInit__xtsloop(void)
{
    return PyModule_Create(&module);
}
