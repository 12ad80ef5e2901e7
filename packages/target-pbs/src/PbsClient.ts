/**
 * Client of a Proxmox Backup Server (spec §6): TLS with certificate pinning checked before any
 * credential is sent, API-token or ticket authentication (secrets are `Redacted` and never logged),
 * the JSON API over HTTP/1.1, and the backup and reader protocols (HTTP/1.1 upgrade, then HTTP/2 on
 * the same socket). Server errors arrive as typed errors carrying the HTTP status and the server's
 * plain-text message.
 *
 * The snapshot-level writer and the restore API build on this: `PbsSnapshotWriter`, `PbsRestore`.
 *
 * @since 0.1.0
 */
import * as Config from "effect/Config"
import type * as ConfigError from "effect/ConfigError"
import * as Context from "effect/Context"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Redacted from "effect/Redacted"
import * as Ref from "effect/Ref"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import * as Transport from "./internal/transport.js"
import {
  PbsAuthError,
  PbsClientError,
  type PbsConnectionError,
  type PbsError,
  PbsHttpError,
  type PbsTlsError
} from "./PbsError.js"
import * as Snapshot from "./Snapshot.js"

/**
 * How to authenticate: an API token (`user@realm!name` and its secret), or a user and password
 * (ticket login; the ticket is renewed after 15 minutes).
 *
 * @since 0.1.0
 * @category models
 */
export type PbsAuth =
  | { readonly _tag: "ApiToken"; readonly tokenId: string; readonly secret: Redacted.Redacted<string> }
  | { readonly _tag: "Password"; readonly userid: string; readonly password: Redacted.Redacted<string> }

/**
 * @since 0.1.0
 * @category models
 */
export interface PbsClientOptions {
  readonly host: string
  /** Default 8007. */
  readonly port?: number
  readonly datastore: string
  readonly auth: PbsAuth
  /** SHA-256 fingerprint of the server certificate (`aa:bb:…`), accepted when the chain does not validate. */
  readonly fingerprint?: string | undefined
  /** Extra trusted CA certificates (PEM). */
  readonly ca?: string | undefined
  /** Default 10 seconds. */
  readonly connectTimeout?: Duration.DurationInput
}

/**
 * @since 0.1.0
 * @category models
 */
export interface PbsVersion {
  readonly version: string
  readonly release: string
}

/**
 * A snapshot as the server lists it.
 *
 * @since 0.1.0
 * @category models
 */
export interface SnapshotListItem {
  readonly backupType: string
  readonly backupId: string
  readonly backupTime: number
  readonly files: ReadonlyArray<{ readonly filename: string; readonly size?: number | undefined }>
  readonly owner?: string | undefined
}

/**
 * The raw backup protocol on one connection (spec §6.5). All per-backup server state lives as long
 * as the connection, which closes with the scope; the server deletes the snapshot unless `finish`
 * succeeded.
 *
 * @since 0.1.0
 * @category models
 */
export interface BackupProtocol {
  readonly snapshot: Snapshot.SnapshotId
  readonly previousBackupTime: Effect.Effect<number | undefined, PbsError>
  /** An archive of the previous snapshot (an index also registers its chunks as known). */
  readonly downloadPrevious: (archiveName: string) => Effect.Effect<Buffer, PbsError>
  readonly uploadBlob: (fileName: string, blob: Uint8Array) => Effect.Effect<void, PbsError>
  readonly createFixedIndex: (archiveName: string, size: number, reuseCsum?: string) => Effect.Effect<number, PbsError>
  readonly appendFixedIndex: (
    wid: number,
    entries: ReadonlyArray<{ readonly digest: string; readonly offset: number }>
  ) => Effect.Effect<void, PbsError>
  /** `blob` may come in parts (header, payload), sent one after the other without joining them. */
  readonly uploadFixedChunk: (
    wid: number,
    chunk: {
      readonly digest: string
      readonly size: number
      readonly blob: Uint8Array | ReadonlyArray<Uint8Array>
    }
  ) => Effect.Effect<void, PbsError>
  readonly closeFixedIndex: (
    wid: number,
    close: { readonly chunkCount: number; readonly size: number; readonly csum: string }
  ) => Effect.Effect<void, PbsError>
  readonly finish: Effect.Effect<void, PbsError>
  /** Closes the connection now. */
  readonly close: Effect.Effect<void>
}

/**
 * The raw reader protocol on one connection (spec §6.9).
 *
 * @since 0.1.0
 * @category models
 */
export interface ReaderProtocol {
  readonly snapshot: Snapshot.SnapshotId
  /** A file of the snapshot; downloading an index authorises its chunks. */
  readonly download: (fileName: string) => Effect.Effect<Buffer, PbsError>
  /** The raw DataBlob of a chunk. */
  readonly chunk: (digest: string) => Effect.Effect<Buffer, PbsError>
  readonly close: Effect.Effect<void>
}

/**
 * @since 0.1.0
 * @category models
 */
export interface PbsClientService {
  readonly host: string
  readonly port: number
  readonly datastore: string
  /** `user@realm` or `user@realm!token`. */
  readonly authId: string
  readonly version: Effect.Effect<PbsVersion, PbsError>
  readonly listSnapshots: (filter?: {
    readonly ns?: string
    readonly backupType?: Snapshot.BackupType
    readonly backupId?: string
  }) => Effect.Effect<ReadonlyArray<SnapshotListItem>, PbsError>
  /** Writes `client.log.blob` of a finished snapshot (once). */
  readonly uploadBackupLog: (snapshot: Snapshot.SnapshotId, blob: Uint8Array) => Effect.Effect<void, PbsError>
  /** Creates a namespace below an existing parent. */
  readonly createNamespace: (ns: string) => Effect.Effect<void, PbsError>
  readonly openBackup: (snapshot: Snapshot.SnapshotId) => Effect.Effect<BackupProtocol, PbsError, Scope.Scope>
  readonly openReader: (snapshot: Snapshot.SnapshotId) => Effect.Effect<ReaderProtocol, PbsError, Scope.Scope>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class PbsClient extends Context.Tag("@vzdump/target-pbs/PbsClient")<PbsClient, PbsClientService>() {}

/**
 * @since 0.1.0
 * @category constants
 */
export const BACKUP_PROTOCOL = "proxmox-backup-protocol-v1"

/**
 * @since 0.1.0
 * @category constants
 */
export const READER_PROTOCOL = "proxmox-backup-reader-protocol-v1"

const Envelope = <A, I>(data: Schema.Schema<A, I>) => Schema.Struct({ data })

const decodeData = <A, I>(schema: Schema.Schema<A, I>, method: string, path: string) => (body: Buffer) =>
  Effect.try({
    try: () => JSON.parse(body.toString("utf8")) as unknown,
    catch: () =>
      new PbsHttpError({
        method,
        path,
        status: 200,
        text: `invalid JSON answer: ${body.toString("utf8").slice(0, 200)}`
      })
  }).pipe(
    Effect.flatMap((json) => Schema.decodeUnknown(Envelope(schema))(json)),
    Effect.map((envelope) => envelope.data),
    Effect.mapError((error) =>
      error._tag === "PbsHttpError"
        ? error
        : new PbsHttpError({ method, path, status: 200, text: `unexpected answer: ${error.message}` })
    )
  )

const TicketAnswer = Schema.Struct({
  username: Schema.String,
  ticket: Schema.String,
  CSRFPreventionToken: Schema.String
})

const SnapshotListSchema = Schema.Array(Schema.Struct({
  "backup-type": Schema.String,
  "backup-id": Schema.String,
  "backup-time": Schema.Number,
  files: Schema.Array(Schema.Struct({ filename: Schema.String, size: Schema.optional(Schema.Number) })),
  owner: Schema.optional(Schema.String)
}))

const snapshotQuery = (datastore: string | undefined, id: Snapshot.SnapshotId): URLSearchParams => {
  const params = new URLSearchParams()
  if (datastore !== undefined) params.set("store", datastore)
  params.set("backup-type", id.backupType)
  params.set("backup-id", id.backupId)
  params.set("backup-time", String(id.backupTime))
  if (id.ns !== undefined && id.ns !== "") params.set("ns", id.ns)
  return params
}

interface Ticket {
  readonly ticket: Redacted.Redacted<string>
  readonly csrf: Redacted.Redacted<string>
  readonly at: number
}

const TICKET_RENEW_MS = 15 * 60 * 1000

const encodedSize = (blob: Uint8Array | ReadonlyArray<Uint8Array>): number => {
  if (blob instanceof Uint8Array) return blob.length
  let total = 0
  for (const part of blob) total += part.length
  return total
}

/**
 * Connects once to check the certificate and the credentials (ticket login, or `GET version`
 * with a token) and returns the client. Connections are opened per request, and per backup or
 * restore session.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = Effect.fn("PbsClient.make")(function*(options: PbsClientOptions) {
  const endpoint: Transport.Endpoint = {
    host: options.host,
    port: options.port ?? 8007,
    fingerprint: options.fingerprint,
    ca: options.ca,
    connectTimeout: Duration.decode(options.connectTimeout ?? "10 seconds")
  }
  const auth = options.auth
  const authId = auth._tag === "ApiToken" ? auth.tokenId : auth.userid
  const ticketRef = yield* Ref.make<Ticket | undefined>(undefined)

  const login = (password: Redacted.Redacted<string>) =>
    Effect.gen(function*() {
      if (auth._tag !== "Password") return yield* Effect.die("login without a password")
      const body = new URLSearchParams({ username: auth.userid, password: Redacted.value(password) }).toString()
      const response = yield* Transport.request(endpoint, {
        method: "POST",
        path: "/api2/json/access/ticket",
        headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body
      })
      if (response.status !== 200) {
        return yield* Effect.fail(
          response.status === 401 || response.status === 403
            ? new PbsAuthError({ status: response.status, text: response.body.toString("utf8").trim() })
            : Transport.statusError("POST", "/api2/json/access/ticket", response.status, response.body)
        )
      }
      const answer = yield* decodeData(TicketAnswer, "POST", "/api2/json/access/ticket")(response.body)
      const ticket: Ticket = {
        ticket: Redacted.make(answer.ticket),
        csrf: Redacted.make(answer.CSRFPreventionToken),
        at: Date.now()
      }
      yield* Ref.set(ticketRef, ticket)
      return ticket
    })

  const authHeaders = (method: string): Effect.Effect<Record<string, string>, PbsError> =>
    Effect.gen(function*() {
      if (auth._tag === "ApiToken") {
        return { Authorization: `PBSAPIToken=${auth.tokenId}:${encodeURIComponent(Redacted.value(auth.secret))}` }
      }
      let ticket = yield* Ref.get(ticketRef)
      if (ticket === undefined) ticket = yield* login(auth.password)
      else if (Date.now() - ticket.at > TICKET_RENEW_MS) ticket = yield* login(ticket.ticket)
      return {
        Cookie: `PBSAuthCookie=${encodeURIComponent(Redacted.value(ticket.ticket))}`,
        ...(method !== "GET" ? { CSRFPreventionToken: Redacted.value(ticket.csrf) } : {})
      }
    })

  const api = <A, I>(
    method: "GET" | "POST",
    path: string,
    schema: Schema.Schema<A, I>,
    extra: { readonly query?: URLSearchParams; readonly body?: Uint8Array | string; readonly contentType?: string } = {}
  ) =>
    Effect.gen(function*() {
      const headers = yield* authHeaders(method)
      const query = extra.query === undefined || extra.query.size === 0 ? "" : `?${extra.query.toString()}`
      const response = yield* Transport.request(endpoint, {
        method,
        path: `/api2/json${path}${query}`,
        headers: { ...headers, ...(extra.contentType !== undefined ? { "Content-Type": extra.contentType } : {}) },
        ...(extra.body !== undefined ? { body: extra.body } : {})
      })
      if (response.status < 200 || response.status >= 300) {
        return yield* Effect.fail(Transport.statusError(method, `/api2/json${path}`, response.status, response.body))
      }
      return yield* decodeData(schema, method, `/api2/json${path}`)(response.body)
    })

  const datastorePath = `/admin/datastore/${encodeURIComponent(options.datastore)}`

  const validateId = (snapshot: Snapshot.SnapshotId) => Snapshot.validate(snapshot)

  const openBackup = (snapshot: Snapshot.SnapshotId) =>
    Effect.gen(function*() {
      yield* validateId(snapshot)
      const headers = yield* authHeaders("GET")
      const conn = yield* Transport.upgrade(endpoint, {
        path: `/api2/json/backup?${snapshotQuery(options.datastore, snapshot).toString()}`,
        protocol: BACKUP_PROTOCOL,
        headers
      })
      yield* Effect.logDebug(`backup connection open for ${Snapshot.snapshotPath(snapshot)}`)
      const jsonData = <A, I>(schema: Schema.Schema<A, I>, method: string, endpointName: string) =>
        decodeData(schema, method, `/${endpointName}`)
      const protocol: BackupProtocol = {
        snapshot,
        previousBackupTime: conn.request({ method: "GET", endpoint: "previous_backup_time" }).pipe(
          Effect.flatMap(jsonData(Schema.NullOr(Schema.Number), "GET", "previous_backup_time")),
          Effect.map((time) => time ?? undefined)
        ),
        downloadPrevious: (archiveName) =>
          conn.request({ method: "GET", endpoint: "previous", query: { "archive-name": archiveName } }),
        uploadBlob: (fileName, blob) =>
          Effect.asVoid(conn.request({
            method: "POST",
            endpoint: "blob",
            query: { "file-name": fileName, "encoded-size": blob.length },
            body: blob
          })),
        createFixedIndex: (archiveName, size, reuseCsum) =>
          conn.request({
            method: "POST",
            endpoint: "fixed_index",
            json: { "archive-name": archiveName, size, ...(reuseCsum !== undefined ? { "reuse-csum": reuseCsum } : {}) }
          }).pipe(Effect.flatMap(jsonData(Schema.Number, "POST", "fixed_index"))),
        appendFixedIndex: (wid, entries) =>
          Effect.asVoid(conn.request({
            method: "PUT",
            endpoint: "fixed_index",
            json: { wid, "digest-list": entries.map((e) => e.digest), "offset-list": entries.map((e) => e.offset) }
          })),
        uploadFixedChunk: (wid, chunk) =>
          Effect.asVoid(conn.request({
            method: "POST",
            endpoint: "fixed_chunk",
            query: { wid, digest: chunk.digest, size: chunk.size, "encoded-size": encodedSize(chunk.blob) },
            body: chunk.blob
          })),
        closeFixedIndex: (wid, close) =>
          Effect.asVoid(conn.request({
            method: "POST",
            endpoint: "fixed_close",
            json: { wid, "chunk-count": close.chunkCount, size: close.size, csum: close.csum }
          })),
        finish: Effect.asVoid(conn.request({ method: "POST", endpoint: "finish" })),
        close: conn.close
      }
      return protocol
    }).pipe(Effect.withSpan("PbsClient.openBackup", { attributes: { snapshot: Snapshot.snapshotPath(snapshot) } }))

  const openReader = (snapshot: Snapshot.SnapshotId) =>
    Effect.gen(function*() {
      yield* validateId(snapshot)
      const headers = yield* authHeaders("GET")
      const conn = yield* Transport.upgrade(endpoint, {
        path: `/api2/json/reader?${snapshotQuery(options.datastore, snapshot).toString()}`,
        protocol: READER_PROTOCOL,
        headers
      })
      const protocol: ReaderProtocol = {
        snapshot,
        download: (fileName) => conn.request({ method: "GET", endpoint: "download", query: { "file-name": fileName } }),
        chunk: (digest) => conn.request({ method: "GET", endpoint: "chunk", query: { digest } }),
        close: conn.close
      }
      return protocol
    }).pipe(Effect.withSpan("PbsClient.openReader", { attributes: { snapshot: Snapshot.snapshotPath(snapshot) } }))

  const service = PbsClient.of({
    host: options.host,
    port: endpoint.port,
    datastore: options.datastore,
    authId,
    version: api("GET", "/version", Schema.Struct({ version: Schema.String, release: Schema.String })),
    listSnapshots: (filter = {}) => {
      const query = new URLSearchParams()
      if (filter.backupType !== undefined) query.set("backup-type", filter.backupType)
      if (filter.backupId !== undefined) query.set("backup-id", filter.backupId)
      if (filter.ns !== undefined && filter.ns !== "") query.set("ns", filter.ns)
      return api("GET", `${datastorePath}/snapshots`, SnapshotListSchema, { query }).pipe(
        Effect.map((items) =>
          items.map((item) => ({
            backupType: item["backup-type"],
            backupId: item["backup-id"],
            backupTime: item["backup-time"],
            files: item.files,
            owner: item.owner
          }))
        )
      )
    },
    uploadBackupLog: (snapshot, blob) =>
      Effect.flatMap(validateId(snapshot), () =>
        Effect.asVoid(api("POST", `${datastorePath}/upload-backup-log`, Schema.Unknown, {
          query: snapshotQuery(undefined, snapshot),
          body: blob,
          contentType: "application/octet-stream"
        }))),
    createNamespace: (ns) =>
      Effect.suspend(() => {
        const parts = Snapshot.parseNamespace(ns)
        if (parts === undefined || parts.length === 0) {
          return Effect.fail(new PbsClientError({ reason: "InvalidInput", detail: `invalid namespace '${ns}'` }))
        }
        const body = new URLSearchParams({ name: parts[parts.length - 1]!, parent: parts.slice(0, -1).join("/") })
        return Effect.asVoid(api("POST", `${datastorePath}/namespace`, Schema.Unknown, {
          body: body.toString(),
          contentType: "application/x-www-form-urlencoded"
        }))
      }),
    openBackup,
    openReader
  })

  if (auth._tag === "Password") yield* login(auth.password)
  else yield* service.version
  yield* Effect.logDebug(`connected to PBS ${options.host}:${endpoint.port} as ${authId}`)
  return service
}, (effect, options) =>
  Effect.annotateLogs(effect, { package: "@vzdump/target-pbs", module: "PbsClient", host: options.host }))

/**
 * @since 0.1.0
 * @category layers
 */
export const layer = (options: PbsClientOptions): Layer.Layer<PbsClient, PbsError> =>
  Layer.effect(PbsClient, make(options))

/**
 * @since 0.1.0
 * @category layers
 */
export const layerConfig = (
  config: Config.Config.Wrap<PbsClientOptions>
): Layer.Layer<PbsClient, PbsError | ConfigError.ConfigError> =>
  Layer.effect(PbsClient, Effect.flatMap(Config.unwrap(config), make))

/**
 * The errors `make` can fail with.
 *
 * @since 0.1.0
 * @category errors
 */
export type PbsClientMakeError = PbsTlsError | PbsConnectionError | PbsAuthError | PbsHttpError
