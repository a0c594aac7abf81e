// The system's OpenSSL 3 (Debian's libssl-dev), with small shims for what Swift cannot import:
// function-like macros, 64-bit option macros and C callbacks.
#ifndef TETHER_COPENSSL_SHIMS_H
#define TETHER_COPENSSL_SHIMS_H

#include <openssl/opensslv.h>
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <string.h>

#if OPENSSL_VERSION_MAJOR < 3
#error "Tether needs OpenSSL 3 (Debian: apt-get install libssl-dev)"
#endif

static inline uint64_t tether_op_no_ticket(void) { return SSL_OP_NO_TICKET; }
static inline uint64_t tether_op_cipher_server_preference(void) { return SSL_OP_CIPHER_SERVER_PREFERENCE; }
static inline uint64_t tether_op_no_renegotiation(void) { return SSL_OP_NO_RENEGOTIATION; }
static inline uint64_t tether_op_no_compression(void) { return SSL_OP_NO_COMPRESSION; }
static inline uint64_t tether_op_all(void) { return SSL_OP_ALL; }

static inline long tether_SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int v) { return SSL_CTX_set_min_proto_version(ctx, v); }
static inline long tether_SSL_CTX_set_max_proto_version(SSL_CTX *ctx, int v) { return SSL_CTX_set_max_proto_version(ctx, v); }
static inline long tether_SSL_CTX_set_mode(SSL_CTX *ctx, long m) { return SSL_CTX_set_mode(ctx, m); }
static inline long tether_SSL_set_mode(SSL *ssl, long m) { return SSL_set_mode(ssl, m); }
static inline long tether_SSL_CTX_set_session_cache_mode(SSL_CTX *ctx, long m) { return SSL_CTX_set_session_cache_mode(ctx, m); }
static inline long tether_SSL_CTX_sess_set_cache_size(SSL_CTX *ctx, long n) { return SSL_CTX_sess_set_cache_size(ctx, n); }
static inline long tether_SSL_CTX_set1_groups_list(SSL_CTX *ctx, const char *list) { return SSL_CTX_set1_groups_list(ctx, list); }
static inline long tether_SSL_set_tlsext_host_name(SSL *ssl, const char *name) { return SSL_set_tlsext_host_name(ssl, name); }
static inline int tether_SSL_set_app_data(SSL *ssl, void *arg) { return SSL_set_app_data(ssl, arg); }
static inline void *tether_SSL_get_app_data(const SSL *ssl) { return SSL_get_app_data(ssl); }
static inline void tether_BIO_set_retry_read(BIO *b) { BIO_set_retry_read(b); }
static inline void tether_BIO_clear_retry_flags(BIO *b) { BIO_clear_retry_flags(b); }
static inline int tether_ERR_GET_REASON(unsigned long e) { return ERR_GET_REASON(e); }

/// ALPN on the server: `http/1.1` is selected when the client offers it; a client that offers
/// only other protocols gets the `no_application_protocol` alert (RFC 7301; nginx does the same).
static inline int tether_alpn_select_http11(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                                            const unsigned char *in, unsigned int inlen, void *arg) {
    (void)ssl; (void)arg;
    static const unsigned char h11[] = { 8, 'h', 't', 't', 'p', '/', '1', '.', '1' };
    unsigned int i = 0;
    while (i < inlen) {
        unsigned int n = in[i];
        if (i + 1 + n > inlen) break;
        if (n == 8 && memcmp(in + i + 1, h11 + 1, 8) == 0) {
            *out = in + i + 1;
            *outlen = 8;
            return SSL_TLSEXT_ERR_OK;
        }
        i += 1 + n;
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

static inline void tether_SSL_CTX_select_http11(SSL_CTX *ctx) {
    SSL_CTX_set_alpn_select_cb(ctx, tether_alpn_select_http11, NULL);
}

/// ALPN on the client side (upstream TLS): offers `http/1.1`.
static inline int tether_SSL_CTX_offer_http11(SSL_CTX *ctx) {
    static const unsigned char h11[] = { 8, 'h', 't', 't', 'p', '/', '1', '.', '1' };
    return SSL_CTX_set_alpn_protos(ctx, h11, sizeof h11);
}

/// SNI on the server: calls `pick` with the server name the client sent, if any.
typedef void (*tether_sni_pick)(SSL *ssl, const char *name);
static inline int tether_sni_callback(SSL *ssl, int *alert, void *arg) {
    (void)alert;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (name != NULL && arg != NULL) ((tether_sni_pick)arg)(ssl, name);
    return SSL_TLSEXT_ERR_OK;
}
static inline void tether_SSL_CTX_set_sni_pick(SSL_CTX *ctx, tether_sni_pick pick) {
    SSL_CTX_set_tlsext_servername_callback(ctx, tether_sni_callback);
    SSL_CTX_set_tlsext_servername_arg(ctx, (void *)pick);
}

/// Client session caching (proxy_ssl_session_reuse): OpenSSL hands new sessions to `store`,
/// which keeps a reference (return 1) or not (return 0).
typedef int (*tether_new_session)(SSL *ssl, SSL_SESSION *session);
static inline void tether_SSL_CTX_set_client_session_store(SSL_CTX *ctx, tether_new_session store) {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, store);
}

#endif
