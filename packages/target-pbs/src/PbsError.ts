/**
 * Typed errors of the Proxmox Backup Server target: format errors (blobs, indexes, manifests, key
 * files) and client errors (TLS, authentication, HTTP status with the server's plain-text message,
 * dropped connections, misuse of the writer or reader API). None of them ever carries a secret.
 *
 * @since 0.1.0
 */
import * as Schema from "effect/Schema"

/**
 * A DataBlob (chunk or `*.blob` file) that cannot be encoded or decoded.
 *
 * @since 0.1.0
 * @category errors
 */
export class DataBlobError extends Schema.TaggedError<DataBlobError>("@vzdump/target-pbs/DataBlobError")(
  "DataBlobError",
  {
    reason: Schema.Literal(
      "TooSmall",
      "BadMagic",
      "CrcMismatch",
      "MissingKey",
      "WrongKey",
      "Decompress",
      "TooLarge",
      "DigestMismatch",
      "LengthMismatch"
    ),
    detail: Schema.String
  }
) {
  override get message(): string {
    return `data blob: ${this.detail}`
  }
}

/**
 * A fixed index (`.fidx`) that is malformed or does not match what the manifest says.
 *
 * @since 0.1.0
 * @category errors
 */
export class IndexError extends Schema.TaggedError<IndexError>("@vzdump/target-pbs/IndexError")("IndexError", {
  reason: Schema.Literal("BadMagic", "BadLength", "BadHeader", "CsumMismatch", "SizeMismatch"),
  detail: Schema.String
}) {
  override get message(): string {
    return `fixed index: ${this.detail}`
  }
}

/**
 * A manifest (`index.json.blob`) that does not parse, is not signed correctly, or does not list a file.
 *
 * @since 0.1.0
 * @category errors
 */
export class ManifestError extends Schema.TaggedError<ManifestError>("@vzdump/target-pbs/ManifestError")(
  "ManifestError",
  {
    reason: Schema.Literal(
      "Parse",
      "Canonical",
      "MissingSignature",
      "SignatureMismatch",
      "FingerprintMismatch",
      "FileMissing",
      "FileMismatch"
    ),
    detail: Schema.String
  }
) {
  override get message(): string {
    return `manifest: ${this.detail}`
  }
}

/**
 * A key file or master key that cannot be read, created or used.
 *
 * @since 0.1.0
 * @category errors
 */
export class KeyConfigError extends Schema.TaggedError<KeyConfigError>("@vzdump/target-pbs/KeyConfigError")(
  "KeyConfigError",
  {
    reason: Schema.Literal(
      "Parse",
      "BadKey",
      "ShortPassphrase",
      "WrongPassphrase",
      "FingerprintMismatch",
      "Kdf",
      "Rsa"
    ),
    detail: Schema.String
  }
) {
  override get message(): string {
    return `key: ${this.detail}`
  }
}

/**
 * The server's certificate was not accepted (checked before any credential is sent).
 *
 * @since 0.1.0
 * @category errors
 */
export class PbsTlsError extends Schema.TaggedError<PbsTlsError>("@vzdump/target-pbs/PbsTlsError")("PbsTlsError", {
  reason: Schema.Literal("FingerprintMismatch", "Untrusted", "Connect"),
  detail: Schema.String
}) {
  override get message(): string {
    return `TLS: ${this.detail}`
  }
}

/**
 * The server refused the credentials (HTTP 401, or a failed ticket login).
 *
 * @since 0.1.0
 * @category errors
 */
export class PbsAuthError extends Schema.TaggedError<PbsAuthError>("@vzdump/target-pbs/PbsAuthError")("PbsAuthError", {
  status: Schema.Number,
  text: Schema.String
}) {
  override get message(): string {
    return `authentication failed (HTTP ${this.status}): ${this.text}`
  }
}

/**
 * A non-2xx answer of the server; `text` is its plain-text error body.
 *
 * @since 0.1.0
 * @category errors
 */
export class PbsHttpError extends Schema.TaggedError<PbsHttpError>("@vzdump/target-pbs/PbsHttpError")("PbsHttpError", {
  method: Schema.String,
  path: Schema.String,
  status: Schema.Number,
  text: Schema.String
}) {
  override get message(): string {
    return `${this.method} ${this.path}: HTTP ${this.status}: ${this.text}`
  }
}

/**
 * The connection could not be opened, was not upgraded, or ended before an answer.
 *
 * @since 0.1.0
 * @category errors
 */
export class PbsConnectionError extends Schema.TaggedError<PbsConnectionError>(
  "@vzdump/target-pbs/PbsConnectionError"
)("PbsConnectionError", {
  reason: Schema.Literal("Connect", "Upgrade", "Closed", "Protocol", "Timeout"),
  detail: Schema.String
}) {
  override get message(): string {
    return `connection: ${this.detail}`
  }
}

/**
 * The writer or reader API was used in a way the protocol does not allow, or local I/O failed.
 *
 * @since 0.1.0
 * @category errors
 */
export class PbsClientError extends Schema.TaggedError<PbsClientError>("@vzdump/target-pbs/PbsClientError")(
  "PbsClientError",
  {
    reason: Schema.Literal("InvalidInput", "InvalidState", "Io"),
    detail: Schema.String
  }
) {
  override get message(): string {
    return this.detail
  }
}

/**
 * Every error of this package.
 *
 * @since 0.1.0
 * @category errors
 */
export type PbsError =
  | DataBlobError
  | IndexError
  | ManifestError
  | KeyConfigError
  | PbsTlsError
  | PbsAuthError
  | PbsHttpError
  | PbsConnectionError
  | PbsClientError
