/**
 * The manifest `index.json.blob` (spec §4): the list of archives with their exact size and csum,
 * the HMAC-SHA256 signature over its canonical JSON when a key is used, and the `unprotected`
 * part outside the signature.
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as ParseResult from "effect/ParseResult"
import * as Schema from "effect/Schema"
import type { CryptConfig } from "./CryptConfig.js"
import * as DataBlob from "./DataBlob.js"
import * as Bytes from "./internal/bytes.js"
import type { DataBlobError } from "./PbsError.js"
import { ManifestError } from "./PbsError.js"

/**
 * @since 0.1.0
 * @category schemas
 */
export const CryptMode = Schema.Literal("none", "encrypt", "sign-only")

/**
 * @since 0.1.0
 * @category models
 */
export type CryptMode = typeof CryptMode.Type

/**
 * One archive of a snapshot.
 *
 * @since 0.1.0
 * @category schemas
 */
export const FileInfo = Schema.Struct({
  filename: Schema.String,
  "crypt-mode": Schema.optionalWith(CryptMode, { default: () => "none" as const }),
  size: Schema.NonNegativeInt,
  csum: Schema.String.pipe(Schema.pattern(/^[0-9a-fA-F]{64}$/))
})

/**
 * @since 0.1.0
 * @category models
 */
export type FileInfo = typeof FileInfo.Type

/**
 * The manifest as PBS parses it (unknown fields are dropped, as the server does).
 *
 * @since 0.1.0
 * @category schemas
 */
export const Manifest = Schema.Struct({
  "backup-type": Schema.Literal("vm", "ct", "host"),
  "backup-id": Schema.String,
  "backup-time": Schema.Int,
  files: Schema.Array(FileInfo),
  unprotected: Schema.optionalWith(Schema.Record({ key: Schema.String, value: Schema.Unknown }), {
    default: () => ({})
  }),
  signature: Schema.optionalWith(Schema.NullOr(Schema.String), { default: () => null })
})

/**
 * @since 0.1.0
 * @category models
 */
export type Manifest = typeof Manifest.Type

/**
 * The archive name of the manifest itself.
 *
 * @since 0.1.0
 * @category constants
 */
export const MANIFEST_BLOB_NAME = "index.json.blob"

/**
 * A manifest without signature.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (input: {
  readonly backupType: Manifest["backup-type"]
  readonly backupId: string
  readonly backupTime: number
  readonly files: ReadonlyArray<FileInfo>
  readonly unprotected?: Record<string, unknown>
}): Manifest => ({
  "backup-type": input.backupType,
  "backup-id": input.backupId,
  "backup-time": input.backupTime,
  files: input.files,
  unprotected: input.unprotected ?? {},
  signature: null
})

const fail = (reason: ManifestError["reason"], detail: string) => Either.left(new ManifestError({ reason, detail }))

const byteOrder = (a: string, b: string): number => Buffer.compare(Buffer.from(a), Buffer.from(b))

const canonicalParts = (value: unknown, out: Array<string>): string | undefined => {
  if (value === null || value === undefined) return "null value in signed part"
  switch (typeof value) {
    case "string":
      out.push(JSON.stringify(value))
      return undefined
    case "boolean":
      out.push(value ? "true" : "false")
      return undefined
    case "number":
      if (!Number.isFinite(value)) return `number ${value} is not representable`
      out.push(JSON.stringify(value))
      return undefined
    case "object": {
      if (Array.isArray(value)) {
        out.push("[")
        for (let i = 0; i < value.length; i++) {
          if (i > 0) out.push(",")
          const error = canonicalParts(value[i], out)
          if (error !== undefined) return error
        }
        out.push("]")
        return undefined
      }
      const record = value as Record<string, unknown>
      const keys = Object.keys(record).filter((key) => record[key] !== undefined).sort(byteOrder)
      out.push("{")
      for (let i = 0; i < keys.length; i++) {
        if (i > 0) out.push(",")
        out.push(JSON.stringify(keys[i]), ":")
        const error = canonicalParts(record[keys[i]!], out)
        if (error !== undefined) return error
      }
      out.push("}")
      return undefined
    }
    default:
      return `cannot serialise a ${typeof value}`
  }
}

/**
 * Canonical JSON (`proxmox-serde`): no whitespace, object keys in byte order, `null` refused.
 *
 * @since 0.1.0
 * @category encoding
 */
export const canonicalJson = (value: unknown): Either.Either<string, ManifestError> => {
  const out: Array<string> = []
  const error = canonicalParts(value, out)
  return error === undefined ? Either.right(out.join("")) : fail("Canonical", error)
}

/**
 * The JSON form of a manifest (encoded, defaults filled in).
 *
 * @since 0.1.0
 * @category encoding
 */
export const toJsonObject = (manifest: Manifest): Record<string, unknown> => ({
  "backup-type": manifest["backup-type"],
  "backup-id": manifest["backup-id"],
  "backup-time": manifest["backup-time"],
  files: manifest.files.map((file) => ({
    filename: file.filename,
    "crypt-mode": file["crypt-mode"],
    size: file.size,
    csum: file.csum
  })),
  signature: manifest.signature,
  unprotected: manifest.unprotected
})

/**
 * Pretty-printed JSON, as the reference client writes.
 *
 * @since 0.1.0
 * @category encoding
 */
export const toJson = (manifest: Manifest): string => JSON.stringify(toJsonObject(manifest), null, 2)

/**
 * The signature of a manifest: hex HMAC-SHA256 with `id_key` over the canonical JSON of everything
 * but `unprotected` and `signature` (§4.2).
 *
 * @since 0.1.0
 * @category signing
 */
export const computeSignature = (manifest: Manifest, crypt: CryptConfig): Either.Either<string, ManifestError> => {
  const { signature: _signature, unprotected: _unprotected, ...signed } = toJsonObject(manifest)
  return Either.map(canonicalJson(signed), (text) => Bytes.toHex(crypt.sign(Buffer.from(text))))
}

/**
 * Signs a manifest and records the key fingerprint in `unprotected["key-fingerprint"]`.
 *
 * @since 0.1.0
 * @category signing
 */
export const sign = (manifest: Manifest, crypt: CryptConfig): Effect.Effect<Manifest, ManifestError> =>
  Effect.map(Effect.suspend(() => computeSignature(manifest, crypt)), (signature) => ({
    ...manifest,
    unprotected: { ...manifest.unprotected, "key-fingerprint": crypt.fingerprint },
    signature
  }))

/**
 * Checks the key fingerprint recorded in the manifest (when present) and the signature.
 *
 * @since 0.1.0
 * @category signing
 */
export const verifySignature = (manifest: Manifest, crypt: CryptConfig): Effect.Effect<void, ManifestError> =>
  Effect.suspend(() => {
    const recorded = manifest.unprotected["key-fingerprint"]
    if (typeof recorded === "string" && recorded.toLowerCase() !== crypt.fingerprint) {
      return fail(
        "FingerprintMismatch",
        `wrong key - manifest's key ${recorded} does not match provided key ${crypt.fingerprint}`
      )
    }
    if (manifest.signature === null) return fail("MissingSignature", "manifest is not signed")
    const signature = manifest.signature
    return Either.flatMap(computeSignature(manifest, crypt), (expected) =>
      Bytes.bytesEqual(Buffer.from(expected), Buffer.from(signature.toLowerCase()))
        ? Either.right(undefined)
        : fail("SignatureMismatch", "wrong signature in manifest"))
  })

/**
 * Parses manifest JSON.
 *
 * @since 0.1.0
 * @category decoding
 */
export const parseJson = (text: string | Uint8Array): Effect.Effect<Manifest, ManifestError> =>
  Effect.suspend(() => {
    let json: unknown
    try {
      json = JSON.parse(typeof text === "string" ? text : Buffer.from(text).toString("utf8"))
    } catch (cause) {
      return fail("Parse", `invalid JSON: ${cause instanceof Error ? cause.message : String(cause)}`)
    }
    return Either.mapLeft(
      Schema.decodeUnknownEither(Manifest)(json),
      (error) => new ManifestError({ reason: "Parse", detail: ParseResult.TreeFormatter.formatErrorSync(error) })
    )
  })

/**
 * The manifest blob: compressed, never encrypted (§4.1).
 *
 * @since 0.1.0
 * @category encoding
 */
export const encodeBlob = (manifest: Manifest): Effect.Effect<Buffer, DataBlobError> =>
  DataBlob.encode(Buffer.from(toJson(manifest)), { compress: true })

/**
 * Decodes a manifest blob; with a key, also verifies the signature and fingerprint.
 *
 * @since 0.1.0
 * @category decoding
 */
export const decodeBlob = (
  blob: Uint8Array,
  crypt?: CryptConfig
): Effect.Effect<Manifest, ManifestError | DataBlobError> =>
  Effect.gen(function*() {
    const data = yield* DataBlob.decode(blob, { maxSize: 16 * 1024 * 1024 })
    const manifest = yield* parseJson(data)
    if (crypt !== undefined) yield* verifySignature(manifest, crypt)
    return manifest
  })

/**
 * The entry of an archive.
 *
 * @since 0.1.0
 * @category getters
 */
export const lookupFile = (manifest: Manifest, filename: string): Either.Either<FileInfo, ManifestError> => {
  const file = manifest.files.find((f) => f.filename === filename)
  return file === undefined ? fail("FileMissing", `manifest does not contain file '${filename}'`) : Either.right(file)
}

/**
 * Checks a downloaded archive's size and csum against its manifest entry.
 *
 * @since 0.1.0
 * @category validation
 */
export const checkFile = (
  manifest: Manifest,
  filename: string,
  actual: { readonly size: number; readonly csum: Uint8Array }
): Either.Either<FileInfo, ManifestError> =>
  Either.flatMap(lookupFile(manifest, filename), (file) => {
    if (file.size !== actual.size) {
      return fail("FileMismatch", `wrong size for file '${filename}' (${file.size} != ${actual.size})`)
    }
    if (file.csum.toLowerCase() !== Bytes.toHex(actual.csum)) {
      return fail("FileMismatch", `wrong checksum for file '${filename}'`)
    }
    return Either.right(file)
  })
