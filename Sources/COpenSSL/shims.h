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
#include <stdio.h>

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
/// With `arg` set (`http2 on`), `h2` is preferred when offered, whatever the client's order.
static inline int tether_alpn_select_http11(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                                            const unsigned char *in, unsigned int inlen, void *arg) {
    (void)ssl;
    static const unsigned char h11[] = { 8, 'h', 't', 't', 'p', '/', '1', '.', '1' };
    unsigned int i = 0;
    while (arg != NULL && i < inlen) {
        unsigned int n = in[i];
        if (i + 1 + n > inlen) break;
        if (n == 2 && in[i + 1] == 'h' && in[i + 2] == '2') {
            *out = in + i + 1;
            *outlen = 2;
            return SSL_TLSEXT_ERR_OK;
        }
        i += 1 + n;
    }
    i = 0;
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

static inline void tether_SSL_CTX_select_http11(SSL_CTX *ctx, int h2) {
    SSL_CTX_set_alpn_select_cb(ctx, tether_alpn_select_http11, h2 ? (void *)1 : NULL);
}
/// Whether the handshake selected `h2`.
static inline int tether_SSL_selected_h2(const SSL *ssl) {
    const unsigned char *p = NULL;
    unsigned int n = 0;
    SSL_get0_alpn_selected(ssl, &p, &n);
    return n == 2 && p[0] == 'h' && p[1] == '2';
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

/// Client certificates (ssl_verify_client): the certificate is asked for and its chain checked,
/// and the handshake goes on whatever the result, as nginx does: the verdict is read after it
/// (SSL_get_verify_result) and answered at the HTTP level (400).
static inline int tether_accept_any_chain(int ok, X509_STORE_CTX *store) { (void)ok; (void)store; return 1; }
static inline void tether_SSL_CTX_verify_client(SSL_CTX *ctx, int depth) {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, tether_accept_any_chain);
    SSL_CTX_set_verify_depth(ctx, depth);
}
/// After an SNI switch (SSL_set_SSL_CTX), the connection takes the chosen context's verification
/// (OpenSSL copies it only at SSL_new).
static inline void tether_SSL_adopt_verify(SSL *ssl, SSL_CTX *ctx) {
    SSL_set_verify(ssl, SSL_CTX_get_verify_mode(ctx), SSL_CTX_get_verify_callback(ctx));
    SSL_set_verify_depth(ssl, SSL_CTX_get_verify_depth(ctx));
}
/// Loads the CRLs of a PEM file into the context's store and checks the whole chain against
/// them. Returns how many were loaded (0: none, or an error).
static inline int tether_SSL_CTX_load_crl(SSL_CTX *ctx, const char *path) {
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    X509_LOOKUP *lookup = X509_STORE_add_lookup(store, X509_LOOKUP_file());
    if (lookup == NULL) return 0;
    int n = X509_load_crl_file(lookup, path, X509_FILETYPE_PEM);
    if (n > 0) X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
    return n;
}
/// The client's certificate facts, as nginx's $ssl_client_* variables show them, written into
/// `out` (at most `size` bytes, NUL-terminated); the length, or -1 without a certificate.
/// what: 0 subject DN, 1 issuer DN (RFC 2253), 2 serial (hex), 3 SHA-1 fingerprint (hex), 4 PEM.
static inline int tether_SSL_peer_fact(SSL *ssl, int what, char *out, int size) {
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (cert == NULL) return -1;
    int n = 0;
    if (what == 0 || what == 1 || what == 4) {
        BIO *b = BIO_new(BIO_s_mem());
        if (b != NULL) {
            if (what == 4) PEM_write_bio_X509(b, cert);
            else X509_NAME_print_ex(b, what == 0 ? X509_get_subject_name(cert) : X509_get_issuer_name(cert), 0, XN_FLAG_RFC2253);
            n = BIO_read(b, out, size - 1);
            if (n < 0) n = 0;
            BIO_free(b);
        }
    } else if (what == 2) {
        BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(cert), NULL);
        char *hex = bn ? BN_bn2hex(bn) : NULL;
        if (hex) { n = (int)strlen(hex); if (n > size - 1) n = size - 1; memcpy(out, hex, n); OPENSSL_free(hex); }
        BN_free(bn);
    } else if (what == 3) {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int len = 0;
        if (X509_digest(cert, EVP_sha1(), md, &len) == 1) {
            static const char hexdigits[] = "0123456789abcdef";
            for (unsigned int i = 0; i < len && 2 * (int)i + 2 < size; i++) {
                out[n++] = hexdigits[md[i] >> 4];
                out[n++] = hexdigits[md[i] & 15];
            }
        }
    }
    out[n] = 0;
    X509_free(cert);
    return n;
}

#include <openssl/ocsp.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
/// OCSP stapling (ssl_stapling): the response a context staples for its certificate `cert`,
/// handed to each client that asks for one (a copy: OpenSSL frees what it is given). The
/// response may be replaced at any time by the thread that fetches it from the responder, so it
/// is read and swapped under `lock`; one past `valid_until` (its nextUpdate) is not stapled.
typedef struct {
    pthread_mutex_t lock;
    unsigned char *der;
    int len;
    time_t valid_until;
    X509 *cert;
} tether_staple;
static inline int tether_staple_callback(SSL *ssl, void *arg) {
    tether_staple *staple = (tether_staple *)arg;
    if (staple == NULL || SSL_get_certificate(ssl) != staple->cert) return SSL_TLSEXT_ERR_NOACK;
    int rc = SSL_TLSEXT_ERR_NOACK;
    pthread_mutex_lock(&staple->lock);
    if (staple->der != NULL && staple->len > 0 && time(NULL) < staple->valid_until) {
        unsigned char *copy = OPENSSL_malloc(staple->len);
        if (copy != NULL) {
            memcpy(copy, staple->der, staple->len);
            SSL_set_tlsext_status_ocsp_resp(ssl, copy, staple->len);
            rc = SSL_TLSEXT_ERR_OK;
        }
    }
    pthread_mutex_unlock(&staple->lock);
    return rc;
}
/// A staple for the certificate the context has now (the last one loaded), with nothing in it.
static inline tether_staple *tether_staple_new(SSL_CTX *ctx) {
    tether_staple *st = calloc(1, sizeof(tether_staple));
    if (st == NULL) return NULL;
    pthread_mutex_init(&st->lock, NULL);
    st->cert = SSL_CTX_get0_certificate(ctx);
    SSL_CTX_set_tlsext_status_cb(ctx, tether_staple_callback);
    SSL_CTX_set_tlsext_status_arg(ctx, st);
    return st;
}
/// Replaces what is stapled with a copy of `der` (NULL: nothing), good until `valid_until`.
static inline void tether_staple_set(tether_staple *st, const unsigned char *der, int len, time_t valid_until) {
    unsigned char *copy = NULL;
    if (der != NULL && len > 0 && (copy = malloc(len)) != NULL) memcpy(copy, der, len);
    pthread_mutex_lock(&st->lock);
    unsigned char *old = st->der;
    st->der = copy;
    st->len = copy != NULL ? len : 0;
    st->valid_until = valid_until;
    pthread_mutex_unlock(&st->lock);
    free(old);
}
/// Whether something is stapled now (for tests and logs).
static inline int tether_staple_present(tether_staple *st) {
    pthread_mutex_lock(&st->lock);
    int present = st->der != NULL && time(NULL) < st->valid_until;
    pthread_mutex_unlock(&st->lock);
    return present;
}
static inline void tether_staple_free(tether_staple *st) {
    if (st == NULL) return;
    pthread_mutex_destroy(&st->lock);
    free(st->der);
    free(st);
}
/// The issuer of the context's certificate: from its chain, else from its trusted store (a
/// reference the caller frees), or NULL.
static inline X509 *tether_ocsp_issuer(SSL_CTX *ctx, X509 *leaf) {
    STACK_OF(X509) *chain = NULL;
    SSL_CTX_get0_chain_certs(ctx, &chain);
    for (int i = 0; chain != NULL && i < sk_X509_num(chain); i++) {
        X509 *c = sk_X509_value(chain, i);
        if (X509_check_issued(c, leaf) == X509_V_OK) { X509_up_ref(c); return c; }
    }
    X509 *issuer = NULL;
    X509_STORE_CTX *sctx = X509_STORE_CTX_new();
    if (sctx != NULL && X509_STORE_CTX_init(sctx, SSL_CTX_get_cert_store(ctx), leaf, NULL) == 1) {
        X509_STORE_CTX_get1_issuer(&issuer, sctx, leaf);
    }
    X509_STORE_CTX_free(sctx);
    return issuer;
}
/// The OCSP request (DER, in a buffer the caller frees with `free`) about the context's
/// certificate, and the first OCSP responder URL of its Authority Information Access, copied
/// into `url` (empty when there is none). Returns the request's length, or -1 with the reason
/// in `why`.
static inline int tether_ocsp_request(SSL_CTX *ctx, unsigned char **out, char *url, int urlsize, char *why, int size) {
    X509 *leaf = SSL_CTX_get0_certificate(ctx);
    int len = -1;
    url[0] = 0;
    if (leaf == NULL) { snprintf(why, size, "no certificate"); return -1; }
    STACK_OF(OPENSSL_STRING) *aia = X509_get1_ocsp(leaf);
    if (aia != NULL && sk_OPENSSL_STRING_num(aia) > 0) snprintf(url, urlsize, "%s", sk_OPENSSL_STRING_value(aia, 0));
    X509_email_free(aia);
    X509 *issuer = tether_ocsp_issuer(ctx, leaf);
    if (issuer == NULL) { snprintf(why, size, "the certificate's issuer is not in its chain nor in ssl_trusted_certificate"); ERR_clear_error(); return -1; }
    OCSP_REQUEST *req = OCSP_REQUEST_new();
    OCSP_CERTID *id = OCSP_cert_to_id(NULL, leaf, issuer);
    X509_free(issuer);
    if (req == NULL || id == NULL || OCSP_request_add0_id(req, id) == NULL) {
        OCSP_CERTID_free(id);
        snprintf(why, size, "cannot make an OCSP request");
    } else {
        unsigned char *der = NULL;
        int n = i2d_OCSP_REQUEST(req, &der);
        if (n > 0) {
            *out = malloc(n);
            if (*out != NULL) { memcpy(*out, der, n); len = n; }
        }
        OPENSSL_free(der);
        if (len < 0) snprintf(why, size, "cannot encode the OCSP request");
    }
    OCSP_REQUEST_free(req);
    ERR_clear_error();
    return len;
}
/// Checks a DER OCSP response for the context's certificate: 1 when it says "good" and is
/// current (and, with `verify`, is signed by a CA the context trusts); otherwise 0, with the
/// reason in `why` (at most `size` bytes). `status` gets the certificate's status when the
/// response names it (V_OCSP_CERTSTATUS_*, else -1) and `valid_until` the response's nextUpdate
/// as a time (0 when it has none).
static inline int tether_check_ocsp(SSL_CTX *ctx, const unsigned char *der, long len, int verify, char *why, int size, int *status, time_t *valid_until) {
    const unsigned char *p = der;
    int ok = 0;
    *status = -1;
    *valid_until = 0;
    OCSP_RESPONSE *resp = d2i_OCSP_RESPONSE(NULL, &p, len);
    OCSP_BASICRESP *basic = NULL;
    OCSP_CERTID *id = NULL;
    X509 *leaf = SSL_CTX_get0_certificate(ctx);
    STACK_OF(X509) *chain = NULL;
    SSL_CTX_get0_chain_certs(ctx, &chain);
    if (resp == NULL) { snprintf(why, size, "not an OCSP response"); goto done; }
    if (OCSP_response_status(resp) != OCSP_RESPONSE_STATUS_SUCCESSFUL) { snprintf(why, size, "the responder said %s", OCSP_response_status_str(OCSP_response_status(resp))); goto done; }
    basic = OCSP_response_get1_basic(resp);
    if (basic == NULL || leaf == NULL) { snprintf(why, size, "no basic response"); goto done; }
    X509 *issuer = tether_ocsp_issuer(ctx, leaf);
    if (issuer == NULL) { snprintf(why, size, "the certificate's issuer is not in its chain nor in ssl_trusted_certificate"); goto done; }
    id = OCSP_cert_to_id(NULL, leaf, issuer);
    X509_free(issuer);
    int reason = 0;
    ASN1_GENERALIZEDTIME *rev = NULL, *thisupd = NULL, *nextupd = NULL;
    if (id == NULL || OCSP_resp_find_status(basic, id, status, &reason, &rev, &thisupd, &nextupd) != 1) { *status = -1; snprintf(why, size, "the response is not about this certificate"); goto done; }
    // A response that does not verify says nothing about the status, whatever it claims.
    if (verify && OCSP_basic_verify(basic, chain, SSL_CTX_get_cert_store(ctx), 0) != 1) { *status = -1; snprintf(why, size, "the response's signature does not verify"); goto done; }
    if (*status != V_OCSP_CERTSTATUS_GOOD) { snprintf(why, size, "the certificate's status is %s", OCSP_cert_status_str(*status)); goto done; }
    if (OCSP_check_validity(thisupd, nextupd, 300, -1) != 1) { snprintf(why, size, "the response is not current (thisUpdate/nextUpdate)"); goto done; }
    if (nextupd != NULL) {
        struct tm tm;
        if (ASN1_TIME_to_tm(nextupd, &tm) == 1) *valid_until = timegm(&tm);
    }
    ok = 1;
done:
    OCSP_CERTID_free(id);
    OCSP_BASICRESP_free(basic);
    OCSP_RESPONSE_free(resp);
    ERR_clear_error();
    return ok;
}

#endif
