/* AES-XTS over whole data units through libcrypto's EVP, shared by the C
 * helpers (luks/_xtsloop.c, nbd/_transmit.c). No OpenSSL headers or link:
 * callers are handed the addresses of EVP_CipherInit_ex and EVP_CipherUpdate
 * (resolved by evp.py with ctypes) and a context holding the key. Call with
 * or without the GIL: nothing here touches Python objects. */
#ifndef NBDLUKS_EVPXTS_H
#define NBDLUKS_EVPXTS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int (*evp_init_fn)(void *ctx, const void *cipher, void *engine,
                           const unsigned char *key, const unsigned char *iv, int enc);
typedef int (*evp_update_fn)(void *ctx, unsigned char *out, int *outl,
                             const unsigned char *in, int inl);

/* IV generators made here (0: the caller gives an array of IVs). */
enum { IV_ARRAY = 0, IV_PLAIN64 = 1, IV_PLAIN = 2, IV_PLAIN64BE = 3 };

static inline void evpxts_iv(unsigned char iv[16], int mode, uint64_t sector)
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

/* In place over `count` units of `unit` bytes at `p`: unit i with the IV of
 * sector first + i*step (or ivs + 16*i for IV_ARRAY). 1: done, 0: EVP failed. */
static inline int evpxts_units(evp_init_fn init, evp_update_fn update, void *ctx,
                               unsigned char *p, size_t count, int unit, uint64_t first,
                               uint64_t step, int mode, const unsigned char *ivs)
{
    unsigned char iv[16];
    int ok = 1;
    for (size_t i = 0; i < count && ok; i++) {
        const unsigned char *this_iv = iv;
        if (mode == IV_ARRAY)
            this_iv = ivs + 16 * i;
        else
            evpxts_iv(iv, mode, first + (uint64_t)i * step);
        int outl = 0;
        ok = init(ctx, NULL, NULL, NULL, this_iv, -1) == 1
             && update(ctx, p + i * (size_t)unit, &outl, p + i * (size_t)unit, unit) == 1;
    }
    memset(iv, 0, sizeof(iv));
    return ok;
}

#endif
