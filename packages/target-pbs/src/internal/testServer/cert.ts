/**
 * A self-signed certificate for the test server, made with the `openssl` CLI (EC P-256, valid
 * two days, `CN=localhost`, SANs `localhost` and `127.0.0.1`).
 */
import { execFile } from "node:child_process"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as Effect from "effect/Effect"

export interface Certificate {
  readonly keyPem: string
  readonly certPem: string
  /** SHA-256 of the DER certificate, 32 lowercase hex bytes joined by `:`. */
  readonly fingerprint: string
}

export const generate = (subject: string): Effect.Effect<Certificate, Error> =>
  Effect.acquireUseRelease(
    Effect.sync(() => fs.mkdtempSync(path.join(os.tmpdir(), "pbs-cert-"))),
    (dir) =>
      Effect.async<Certificate, Error>((resume) => {
        const keyFile = path.join(dir, "key.pem")
        const certFile = path.join(dir, "cert.pem")
        const child = execFile(
          "openssl",
          [
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", keyFile, "-out", certFile, "-days", "2", "-subj", subject,
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"
          ],
          (error) => {
            if (error !== null) {
              resume(Effect.fail(new Error(`openssl failed: ${error.message}`)))
              return
            }
            try {
              const certPem = fs.readFileSync(certFile, "utf8")
              const keyPem = fs.readFileSync(keyFile, "utf8")
              const fingerprint = new crypto.X509Certificate(certPem).fingerprint256.toLowerCase()
              resume(Effect.succeed({ keyPem, certPem, fingerprint }))
            } catch (cause) {
              resume(Effect.fail(cause instanceof Error ? cause : new Error(String(cause))))
            }
          }
        )
        return Effect.sync(() => {
          child.kill()
        })
      }),
    (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
  )
