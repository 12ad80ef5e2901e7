/**
 * A Proxmox Backup Server look-alike **for tests and the local demo** — not for storing real
 * backups. It speaks the real protocol over loopback HTTPS (self-signed certificate made with the
 * `openssl` CLI at start): ticket and API-token authentication, the HTTP/1.1 upgrades to
 * `proxmox-backup-protocol-v1` and `proxmox-backup-reader-protocol-v1` followed by HTTP/2 on the
 * same socket, every backup and reader endpoint with the checks and error texts of PBS 3.2
 * (known-chunk rule, chunk digest/length/CRC, index size/count/csum on close, manifest parsed and
 * rewritten on `finish`, unfinished snapshots removed when the connection ends, strictly newer
 * backup time, group owner, namespaces), and a datastore in PBS's on-disk layout in a directory
 * the caller chooses. Faults can be injected (`onRequest` returning `"drop"`, `dropConnections`).
 *
 * @since 0.1.0
 */
import * as fs from "node:fs"
import * as path from "node:path"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import type * as Redacted from "effect/Redacted"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import * as Cert from "../internal/testServer/cert.js"
import * as Server from "../internal/testServer/server.js"
import type { MutableStats } from "../internal/testServer/state.js"
import * as Snapshot from "../Snapshot.js"

/**
 * @since 0.1.0
 * @category models
 */
export type Privilege = "Datastore.Backup" | "Datastore.Read"

/**
 * One request the server received (API request, upgrade, or HTTP/2 request of a session). Never
 * contains credentials.
 *
 * @since 0.1.0
 * @category models
 */
export type RequestRecord = Server.RequestRecord

/**
 * Counters since start.
 *
 * @since 0.1.0
 * @category models
 */
export type Stats = Readonly<MutableStats>

/**
 * What `onRequest` may answer: `"drop"` destroys the connection without an answer.
 *
 * @since 0.1.0
 * @category models
 */
export type RequestHook = (request: RequestRecord) => "drop" | undefined

/**
 * @since 0.1.0
 * @category models
 */
export interface PbsTestServerOptions {
  /** Datastores by name, each in a directory of the caller's choice (created if missing). */
  readonly datastores: ReadonlyArray<{ readonly name: string; readonly path: string }>
  /** Users for ticket login (`user@realm`). */
  readonly users?: ReadonlyArray<{
    readonly userid: string
    readonly password: Redacted.Redacted<string>
    readonly privileges?: ReadonlyArray<Privilege>
  }>
  /** API tokens (`user@realm!name`). */
  readonly tokens?: ReadonlyArray<{
    readonly tokenid: string
    readonly secret: Redacted.Redacted<string>
    readonly privileges?: ReadonlyArray<Privilege>
  }>
  /** Namespaces to create at start, e.g. `{ store: "store1", ns: "a/b" }`. */
  readonly namespaces?: ReadonlyArray<{ readonly store: string; readonly ns: string }>
  /** Default `127.0.0.1`. */
  readonly host?: string
  /** Default 0 (an ephemeral port). */
  readonly port?: number
  /** Called for every request before it is handled. */
  readonly onRequest?: RequestHook
}

/**
 * @since 0.1.0
 * @category models
 */
export interface PbsTestServerService {
  readonly host: string
  readonly port: number
  /** SHA-256 fingerprint of the certificate, colon-separated lowercase hex. */
  readonly fingerprint: string
  readonly certificatePem: string
  readonly stats: Effect.Effect<Stats>
  readonly requests: Effect.Effect<ReadonlyArray<RequestRecord>>
  /** Replaces the request hook. */
  readonly setOnRequest: (hook: RequestHook | undefined) => Effect.Effect<void>
  /** Destroys every open backup and reader connection; returns how many. */
  readonly dropConnections: Effect.Effect<number>
  /** Open backup and reader connections. */
  readonly activeSessions: Effect.Effect<number>
  /** The directory of a datastore. */
  readonly datastorePath: (name: string) => string | undefined
}

/**
 * @since 0.1.0
 * @category tags
 */
export class PbsTestServer extends Context.Tag("@vzdump/target-pbs/testing/PbsTestServer")<
  PbsTestServer,
  PbsTestServerService
>() {}

/**
 * @since 0.1.0
 * @category errors
 */
export class PbsTestServerError extends Schema.TaggedError<PbsTestServerError>(
  "@vzdump/target-pbs/testing/PbsTestServerError"
)("PbsTestServerError", {
  reason: Schema.Literal("Certificate", "Start", "Namespace"),
  detail: Schema.String
}) {
  override get message(): string {
    return `PBS test server: ${this.detail}`
  }
}

/**
 * Starts the server; it stops (and drops its connections) when the scope closes.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (
  options: PbsTestServerOptions
): Effect.Effect<PbsTestServerService, PbsTestServerError, Scope.Scope> =>
  Effect.gen(function*() {
    const host = options.host ?? "127.0.0.1"
    const certificate = yield* Effect.mapError(
      Cert.generate("/CN=localhost/O=vzdump-ts PBS test server"),
      (error) => new PbsTestServerError({ reason: "Certificate", detail: error.message })
    )
    let hook: RequestHook | undefined = options.onRequest
    const running = yield* Effect.acquireRelease(
      Effect.mapError(
        Server.start({
          host,
          port: options.port ?? 0,
          stores: options.datastores,
          users: options.users ?? [],
          tokens: options.tokens ?? [],
          onRequest: (request) => hook?.(request),
          certificate
        }),
        (error) => new PbsTestServerError({ reason: "Start", detail: error.message })
      ),
      (running) => running.close
    )
    for (const { ns, store } of options.namespaces ?? []) {
      const datastore = options.datastores.find((d) => d.name === store)
      if (datastore === undefined) {
        return yield* new PbsTestServerError({ reason: "Namespace", detail: `no datastore '${store}'` })
      }
      yield* Effect.try({
        try: () => createNamespaceDir(datastore.path, ns),
        catch: (cause) => new PbsTestServerError({ reason: "Namespace", detail: String(cause) })
      })
    }
    yield* Effect.annotateLogs(Effect.logDebug(`PBS test server listening on ${host}:${running.port}`), {
      package: "@vzdump/target-pbs",
      module: "PbsTestServer"
    })
    return PbsTestServer.of({
      host,
      port: running.port,
      fingerprint: certificate.fingerprint,
      certificatePem: certificate.certPem,
      stats: Effect.sync(() => ({ ...running.stats })),
      requests: Effect.sync(() => [...running.log]),
      setOnRequest: (next) => Effect.sync(() => {
        hook = next
      }),
      dropConnections: Effect.sync(running.dropConnections),
      activeSessions: Effect.sync(running.activeSessions),
      datastorePath: (name) => options.datastores.find((d) => d.name === name)?.path
    })
  })

/**
 * @since 0.1.0
 * @category layers
 */
export const layer = (options: PbsTestServerOptions): Layer.Layer<PbsTestServer, PbsTestServerError> =>
  Layer.scoped(PbsTestServer, make(options))

const createNamespaceDir = (storePath: string, ns: string): void => {
  const parts = Snapshot.parseNamespace(ns)
  if (parts === undefined) throw new Error(`invalid namespace '${ns}'`)
  fs.mkdirSync(path.join(storePath, ...parts.flatMap((part) => ["ns", part])), { recursive: true })
}
