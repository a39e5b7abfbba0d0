/* The per-unit loop of AES-XTS through libcrypto's EVP, in C: one call per
 * request instead of two ctypes calls per data unit, with the GIL released.
 *
 * The caller (evp.py) passes the addresses of EVP_CipherInit_ex and
 * EVP_CipherUpdate it resolved with ctypes, and a context it initialised
 * with the key (see ../_c/evpxts.h). IVs are made there for the plain IV
 * generators, or taken from a caller's array (essiv).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../_c/evpxts.h"

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
    evp_init_fn init = (evp_init_fn)(uintptr_t)init_addr;
    evp_update_fn update = (evp_update_fn)(uintptr_t)update_addr;
    void *ctx = (void *)(uintptr_t)ctx_addr;
    int ok;

    Py_BEGIN_ALLOW_THREADS
    ok = evpxts_units(init, update, ctx, buf.buf, (size_t)count, (int)unit, first, step, mode,
                      ivs.buf);
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
