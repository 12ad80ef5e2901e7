/**
 * Key files (spec §3.3) and the RSA master key (§3.4). A key file is JSON: `kdf` (`null`, Scrypt
 * or PBKDF2), `created`/`modified` (RFC 3339), `data` (the raw key, or `iv ‖ tag ‖ AES-256-GCM`
 * of it under the passphrase-derived key), an optional `fingerprint` checked after decryption and
 * an optional `hint`. Passphrases are `Redacted` and never appear in errors.
 *
 * @since 0.1.0
 */
import * as crypto from "node:crypto"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as ParseResult from "effect/ParseResult"
import * as Redacted from "effect/Redacted"
import * as Schema from "effect/Schema"
import * as CryptConfig from "./CryptConfig.js"
import * as DataBlob from "./DataBlob.js"
import * as Rsa from "./internal/rsa.js"
import type { DataBlobError } from "./PbsError.js"
import { KeyConfigError } from "./PbsError.js"

/**
 * @since 0.1.0
 * @category schemas
 */
export const ScryptParams = Schema.Struct({ n: Schema.Int, r: Schema.Int, p: Schema.Int, salt: Schema.String })

/**
 * @since 0.1.0
 * @category schemas
 */
export const Pbkdf2Params = Schema.Struct({ iter: Schema.Int, salt: Schema.String })

/**
 * The externally tagged KDF enum, or `null` for a key stored in clear.
 *
 * @since 0.1.0
 * @category schemas
 */
export const Kdf = Schema.NullOr(
  Schema.Union(Schema.Struct({ Scrypt: ScryptParams }), Schema.Struct({ PBKDF2: Pbkdf2Params }))
)

/**
 * @since 0.1.0
 * @category schemas
 */
export const KeyConfig = Schema.Struct({
  kdf: Kdf,
  created: Schema.String,
  modified: Schema.String,
  data: Schema.String,
  fingerprint: Schema.optional(Schema.NullOr(Schema.String)),
  hint: Schema.optional(Schema.NullOr(Schema.String))
})

/**
 * @since 0.1.0
 * @category models
 */
export type KeyConfig = typeof KeyConfig.Type

/**
 * The key a key file holds.
 *
 * @since 0.1.0
 * @category models
 */
export interface DecryptedKey {
  readonly rawKey: Redacted.Redacted<Uint8Array>
  /** Epoch seconds. */
  readonly created: number
  readonly fingerprint: string
}

/**
 * The name of the master-key blob in a snapshot.
 *
 * @since 0.1.0
 * @category constants
 */
export const MASTER_KEY_BLOB_NAME = "rsa-encrypted.key.blob"

const failWith = (reason: KeyConfigError["reason"], detail: string) => new KeyConfigError({ reason, detail })

/**
 * RFC 3339 in local time with its offset, as PBS writes it.
 *
 * @since 0.1.0
 * @category formatting
 */
export const formatTime = (epoch: number): string => {
  const date = new Date(epoch * 1000)
  const offset = -date.getTimezoneOffset()
  const local = new Date(epoch * 1000 + offset * 60_000).toISOString().slice(0, 19)
  if (offset === 0) return `${local}Z`
  const abs = Math.abs(offset)
  const pad = (n: number) => String(n).padStart(2, "0")
  return `${local}${offset > 0 ? "+" : "-"}${pad(Math.floor(abs / 60))}:${pad(abs % 60)}`
}

const parseTime = (value: string): number | undefined => {
  if (!/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/i.test(value)) return undefined
  const ms = Date.parse(value)
  return Number.isFinite(ms) ? Math.floor(ms / 1000) : undefined
}

/**
 * Parses a key file.
 *
 * @since 0.1.0
 * @category decoding
 */
export const parse = (json: string | Uint8Array): Effect.Effect<KeyConfig, KeyConfigError> =>
  Effect.suspend(() => {
    let value: unknown
    try {
      value = JSON.parse(typeof json === "string" ? json : Buffer.from(json).toString("utf8"))
    } catch (cause) {
      return Effect.fail(failWith("Parse", `invalid JSON: ${cause instanceof Error ? cause.message : String(cause)}`))
    }
    return Either.mapLeft(
      Schema.decodeUnknownEither(KeyConfig)(value),
      (error) => failWith("Parse", ParseResult.TreeFormatter.formatErrorSync(error))
    )
  })

/**
 * Pretty-printed JSON of a key file.
 *
 * @since 0.1.0
 * @category encoding
 */
export const toJson = (config: KeyConfig): string => JSON.stringify(Schema.encodeSync(KeyConfig)(config), null, 2)

const scrypt = (passphrase: Buffer, salt: Buffer, n: number, r: number, p: number) =>
  Effect.async<Buffer, KeyConfigError>((resume) => {
    try {
      crypto.scrypt(passphrase, salt, 32, { N: n, r, p, maxmem: 256 * 1024 * 1024 + 128 * n * r }, (error, key) => {
        resume(error === null ? Effect.succeed(key) : Effect.fail(failWith("Kdf", `scrypt failed: ${error.message}`)))
      })
    } catch (cause) {
      resume(Effect.fail(failWith("Kdf", `scrypt failed: ${cause instanceof Error ? cause.message : String(cause)}`)))
    }
  })

const pbkdf2 = (passphrase: Buffer, salt: Buffer, iterations: number) =>
  Effect.async<Buffer, KeyConfigError>((resume) => {
    try {
      crypto.pbkdf2(passphrase, salt, iterations, 32, "sha256", (error, key) => {
        resume(error === null ? Effect.succeed(key) : Effect.fail(failWith("Kdf", `PBKDF2 failed: ${error.message}`)))
      })
    } catch (cause) {
      resume(Effect.fail(failWith("Kdf", `PBKDF2 failed: ${cause instanceof Error ? cause.message : String(cause)}`)))
    }
  })

/**
 * The key-encryption key of a KDF and passphrase (scrypt or PBKDF2-HMAC-SHA256, 32 bytes).
 *
 * @since 0.1.0
 * @category kdf
 */
export const deriveKey = (
  kdf: NonNullable<KeyConfig["kdf"]>,
  passphrase: Redacted.Redacted<string>
): Effect.Effect<Redacted.Redacted<Uint8Array>, KeyConfigError> =>
  Effect.suspend(() => {
    const secret = Buffer.from(Redacted.value(passphrase), "utf8")
    if (secret.length < 5) return Effect.fail(failWith("ShortPassphrase", "Passphrase is too short!"))
    const derived = "Scrypt" in kdf
      ? scrypt(secret, Buffer.from(kdf.Scrypt.salt, "base64"), kdf.Scrypt.n, kdf.Scrypt.r, kdf.Scrypt.p)
      : pbkdf2(secret, Buffer.from(kdf.PBKDF2.salt, "base64"), kdf.PBKDF2.iter)
    return Effect.map(derived, (key) => Redacted.make(new Uint8Array(key)))
  })

/**
 * Recovers the raw key of a key file (the passphrase is needed unless `kdf` is `null`) and checks
 * the stored fingerprint.
 *
 * @since 0.1.0
 * @category decoding
 */
export const decrypt = (
  config: KeyConfig,
  passphrase?: Redacted.Redacted<string>
): Effect.Effect<DecryptedKey, KeyConfigError> =>
  Effect.gen(function*() {
    const data = Buffer.from(config.data, "base64")
    let raw: Buffer
    if (config.kdf === null) {
      raw = data
    } else {
      if (passphrase === undefined) {
        return yield* Effect.fail(failWith("WrongPassphrase", "key file needs a passphrase"))
      }
      if (data.length !== 64) {
        return yield* Effect.fail(failWith("Parse", `encrypted key data has ${data.length} bytes, expected 64`))
      }
      const kek = Redacted.value(yield* deriveKey(config.kdf, passphrase))
      try {
        const decipher = crypto.createDecipheriv("aes-256-gcm", kek, data.subarray(0, 16))
        decipher.setAuthTag(data.subarray(16, 32))
        raw = Buffer.concat([decipher.update(data.subarray(32)), decipher.final()])
      } catch {
        return yield* Effect.fail(failWith("WrongPassphrase", "Unable to decrypt key - wrong password?"))
      }
    }
    if (raw.length !== 32) return yield* Effect.fail(failWith("BadKey", `key has ${raw.length} bytes, expected 32`))
    const fingerprint = CryptConfig.fingerprintOf(raw)
    if (typeof config.fingerprint === "string" && config.fingerprint.toLowerCase() !== fingerprint) {
      return yield* Effect.fail(
        failWith(
          "FingerprintMismatch",
          `got unexpected key fingerprint ${fingerprint} (expected ${config.fingerprint})`
        )
      )
    }
    const created = parseTime(config.created)
    if (created === undefined) {
      return yield* Effect.fail(failWith("Parse", `invalid 'created' time '${config.created}'`))
    }
    return { rawKey: Redacted.make(new Uint8Array(raw)), created, fingerprint }
  })

/**
 * A `CryptConfig` from key-file JSON.
 *
 * @since 0.1.0
 * @category decoding
 */
export const load = (
  json: string | Uint8Array,
  passphrase?: Redacted.Redacted<string>
): Effect.Effect<CryptConfig.CryptConfig, KeyConfigError> =>
  Effect.flatMap(
    parse(json),
    (config) => Effect.flatMap(decrypt(config, passphrase), (key) => CryptConfig.make(key.rawKey))
  )

/**
 * Options of {@link create}.
 *
 * @since 0.1.0
 * @category models
 */
export interface CreateOptions {
  /** `scrypt` (N 65536, r 8, p 1), `pbkdf2` (65535 iterations) or `none` (key in clear). */
  readonly kdf: "scrypt" | "pbkdf2" | "none"
  readonly passphrase?: Redacted.Redacted<string>
  /** Epoch seconds; now by default. */
  readonly created?: number
  readonly hint?: string
}

/**
 * Writes a key into a key file (with a random 32-byte salt and 16-byte IV).
 *
 * @since 0.1.0
 * @category encoding
 */
export const create = (
  crypt: CryptConfig.CryptConfig,
  options: CreateOptions
): Effect.Effect<KeyConfig, KeyConfigError> =>
  Effect.gen(function*() {
    const now = Math.floor(Date.now() / 1000)
    const created = formatTime(options.created ?? now)
    const modified = formatTime(now)
    const raw = Buffer.from(Redacted.value(crypt.rawKey))
    const base = {
      created,
      modified,
      fingerprint: crypt.fingerprint,
      ...(options.hint !== undefined ? { hint: options.hint } : {})
    }
    if (options.kdf === "none") return { kdf: null, ...base, data: raw.toString("base64") }
    if (options.passphrase === undefined) {
      return yield* Effect.fail(failWith("ShortPassphrase", "a passphrase is needed for an encrypted key file"))
    }
    const salt = crypto.randomBytes(32).toString("base64")
    const kdf: NonNullable<KeyConfig["kdf"]> = options.kdf === "scrypt"
      ? { Scrypt: { n: 65536, r: 8, p: 1, salt } }
      : { PBKDF2: { iter: 65535, salt } }
    const kek = Redacted.value(yield* deriveKey(kdf, options.passphrase))
    const iv = crypto.randomBytes(16)
    const cipher = crypto.createCipheriv("aes-256-gcm", kek, iv)
    const ciphertext = Buffer.concat([cipher.update(raw), cipher.final()])
    const data = Buffer.concat([iv, cipher.getAuthTag(), ciphertext]).toString("base64")
    return { kdf, ...base, data }
  })

/**
 * The `rsa-encrypted.key.blob`: the key as a clear key file (compact JSON), RSA-encrypted with
 * PKCS#1 v1.5 padding under the master public key, in an uncompressed, unencrypted DataBlob.
 *
 * @since 0.1.0
 * @category master key
 */
export const masterKeyBlob = (
  crypt: CryptConfig.CryptConfig,
  options: { readonly publicKeyPem: string; readonly created?: number }
): Effect.Effect<Buffer, KeyConfigError | DataBlobError> =>
  Effect.gen(function*() {
    const clear = yield* create(crypt, {
      kdf: "none",
      ...(options.created !== undefined ? { created: options.created } : {})
    })
    const json = Buffer.from(JSON.stringify(Schema.encodeSync(KeyConfig)(clear)))
    const encrypted = yield* Effect.try({
      try: () => crypto.publicEncrypt({ key: options.publicKeyPem, padding: crypto.constants.RSA_PKCS1_PADDING }, json),
      catch: (cause) =>
        failWith("Rsa", `RSA encryption failed: ${cause instanceof Error ? cause.message : String(cause)}`)
    })
    return yield* DataBlob.encode(encrypted, { compress: false })
  })

/**
 * Recovers the key file stored in an `rsa-encrypted.key.blob` with the master private key.
 *
 * @since 0.1.0
 * @category master key
 */
export const recoverFromMasterKeyBlob = (
  blob: Uint8Array,
  privateKeyPem: Redacted.Redacted<string>
): Effect.Effect<KeyConfig, KeyConfigError | DataBlobError> =>
  Effect.gen(function*() {
    const block = yield* DataBlob.decode(blob)
    const result = Rsa.privateDecryptPkcs1(Redacted.value(privateKeyPem), block)
    if (result._tag === "Error") return yield* Effect.fail(failWith("Rsa", result.detail))
    return yield* parse(result.data)
  })
