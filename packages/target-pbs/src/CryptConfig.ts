/**
 * The encryption key of a backup and the values derived from it (spec §3.2): the `id_key`
 * (PBKDF2-HMAC-SHA256 of the key, salt `_id_key`, 10 iterations), keyed chunk digests
 * (`SHA-256(data ‖ id_key)`), the key fingerprint, HMAC-SHA256 signatures and AES-256-GCM with a
 * 16-byte IV and empty AAD. The raw key stays inside; it is reachable only as a `Redacted`.
 *
 * @since 0.1.0
 */
import * as crypto from "node:crypto"
import * as Effect from "effect/Effect"
import * as Redacted from "effect/Redacted"
import * as Bytes from "./internal/bytes.js"
import { KeyConfigError } from "./PbsError.js"

/**
 * `SHA-256("Proxmox Backup Encryption Key Fingerprint")`, prefixed to `id_key` to make the fingerprint.
 *
 * @since 0.1.0
 * @category constants
 */
export const FINGERPRINT_INPUT: Uint8Array = Bytes.sha256(Buffer.from("Proxmox Backup Encryption Key Fingerprint"))

/**
 * Output of an AES-256-GCM encryption.
 *
 * @since 0.1.0
 * @category models
 */
export interface Sealed {
  readonly iv: Uint8Array
  readonly tag: Uint8Array
  readonly ciphertext: Uint8Array
}

/**
 * A usable key.
 *
 * @since 0.1.0
 * @category models
 */
export interface CryptConfig {
  readonly _tag: "CryptConfig"
  /** 32 colon-separated lowercase hex bytes. */
  readonly fingerprint: string
  /** The first 8 bytes of the fingerprint, as shown in logs. */
  readonly keyId: string
  /** The 32-byte key (for key files and the RSA master-key blob). */
  readonly rawKey: Redacted.Redacted<Uint8Array>
  /** `SHA-256(data ‖ id_key)`. */
  readonly computeDigest: (data: Uint8Array) => Uint8Array
  /** `HMAC-SHA256(id_key, data)`. */
  readonly sign: (data: Uint8Array) => Uint8Array
  /** AES-256-GCM with a random (or the given) 16-byte IV and empty AAD. */
  readonly encrypt: (plaintext: Uint8Array, iv?: Uint8Array) => Sealed
  /** The plaintext, or `undefined` when the tag does not verify (wrong key or damaged data). */
  readonly decrypt: (sealed: Sealed) => Uint8Array | undefined
}

/**
 * `id_key` of a raw key.
 *
 * @since 0.1.0
 * @category constructors
 */
export const deriveIdKey = (rawKey: Uint8Array): Uint8Array => crypto.pbkdf2Sync(rawKey, "_id_key", 10, 32, "sha256")

/**
 * The colon-hex fingerprint of a raw key.
 *
 * @since 0.1.0
 * @category constructors
 */
export const fingerprintOf = (rawKey: Uint8Array): string =>
  Bytes.colonHex(Bytes.sha256(FINGERPRINT_INPUT, deriveIdKey(rawKey)))

const build = (key: Buffer): CryptConfig => {
  const idKey = Buffer.from(deriveIdKey(key))
  const fingerprint = Bytes.colonHex(Bytes.sha256(FINGERPRINT_INPUT, idKey))
  return {
    _tag: "CryptConfig",
    fingerprint,
    keyId: fingerprint.slice(0, 23),
    rawKey: Redacted.make(new Uint8Array(key)),
    computeDigest: (data) => Bytes.sha256(data, idKey),
    sign: (data) => crypto.createHmac("sha256", idKey).update(data).digest(),
    encrypt: (plaintext, iv) => {
      const nonce = iv ?? crypto.randomBytes(16)
      const cipher = crypto.createCipheriv("aes-256-gcm", key, nonce)
      const ciphertext = Buffer.concat([cipher.update(plaintext), cipher.final()])
      return { iv: nonce, tag: cipher.getAuthTag(), ciphertext }
    },
    decrypt: (sealed) => {
      try {
        const decipher = crypto.createDecipheriv("aes-256-gcm", key, sealed.iv)
        decipher.setAuthTag(sealed.tag)
        return Buffer.concat([decipher.update(sealed.ciphertext), decipher.final()])
      } catch {
        return undefined
      }
    }
  }
}

/**
 * A key from its 32 raw bytes.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (rawKey: Redacted.Redacted<Uint8Array>): Effect.Effect<CryptConfig, KeyConfigError> =>
  Effect.suspend(() => {
    const key = Redacted.value(rawKey)
    if (key.length !== 32) {
      return Effect.fail(new KeyConfigError({ reason: "BadKey", detail: `key has ${key.length} bytes, expected 32` }))
    }
    return Effect.succeed(build(Buffer.from(key)))
  })

/**
 * A new random key.
 *
 * @since 0.1.0
 * @category constructors
 */
export const generate: Effect.Effect<CryptConfig> = Effect.sync(() => build(crypto.randomBytes(32)))

/**
 * Whether a value is a `CryptConfig`.
 *
 * @since 0.1.0
 * @category guards
 */
export const isCryptConfig = (u: unknown): u is CryptConfig =>
  typeof u === "object" && u !== null && (u as { _tag?: unknown })._tag === "CryptConfig"
