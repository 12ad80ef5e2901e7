/**
 * The HTTPS front of the test server: the JSON API over HTTP/1.1 (ticket login, version,
 * datastore listings, `upload-backup-log`, namespace creation), and the upgrades to the backup
 * and reader protocols, after which HTTP/2 runs on the same socket.
 */
import * as fs from "node:fs"
import * as http from "node:http"
import * as https from "node:https"
import type * as net from "node:net"
import * as path from "node:path"
import type * as tls from "node:tls"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Runtime from "effect/Runtime"
import * as DataBlob from "../../DataBlob.js"
import * as Manifest from "../../Manifest.js"
import * as Snapshot from "../../Snapshot.js"
import { ApiError, attempt, bail } from "./apiError.js"
import * as Auth from "./auth.js"
import * as BackupSession from "./backupSession.js"
import type { Certificate } from "./cert.js"
import * as Datastore from "./datastore.js"
import * as H2 from "./h2.js"
import * as Params from "./params.js"
import * as ReaderSession from "./readerSession.js"
import { emptyStats, type MutableStats, type ServerState } from "./state.js"

export const BACKUP_PROTOCOL = "proxmox-backup-protocol-v1"
export const READER_PROTOCOL = "proxmox-backup-reader-protocol-v1"

export interface RequestRecord {
  /** Number of the TLS connection (1, 2, …). */
  readonly connection: number
  readonly protocol: "api" | "backup" | "reader"
  readonly method: string
  readonly path: string
  /** The query string without `?` (a `password` parameter is removed). */
  readonly query: string
}

export interface ServerConfig {
  readonly host: string
  readonly port: number
  readonly stores: ReadonlyArray<Datastore.Datastore>
  readonly users: ReadonlyArray<Auth.UserEntry>
  readonly tokens: ReadonlyArray<Auth.TokenEntry>
  readonly onRequest: ((request: RequestRecord) => "drop" | undefined) | undefined
  readonly certificate: Certificate
}

export interface Running {
  readonly port: number
  readonly stats: MutableStats
  readonly log: ReadonlyArray<RequestRecord>
  readonly dropConnections: () => number
  readonly activeSessions: () => number
  readonly close: Effect.Effect<void>
}

const API = "/api2/json"

const normalizePath = (raw: string): URL => new URL(raw.replace(/^\/+/, "/"), "http://localhost")

const writeHttpError = (socket: net.Socket, error: ApiError) => {
  const body = Buffer.from(error.text)
  try {
    socket.end(
      Buffer.concat([
        Buffer.from(
          `HTTP/1.1 ${error.status} ${http.STATUS_CODES[error.status] ?? "Error"}\r\n` +
            `content-type: ${H2.JSON_CONTENT_TYPE}\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n`
        ),
        body
      ])
    )
  } catch {
    socket.destroy()
  }
}

const collectBody = (req: http.IncomingMessage, limit: number): Effect.Effect<Buffer, ApiError> =>
  Effect.async<Buffer, ApiError>((resume) => {
    const chunks: Array<Buffer> = []
    let total = 0
    let done = false
    req.on("data", (chunk: Buffer) => {
      total += chunk.length
      if (total > limit && !done) {
        done = true
        resume(bail("Request body too large"))
      } else chunks.push(chunk)
    })
    req.on("end", () => {
      if (!done) {
        done = true
        resume(Effect.succeed(Buffer.concat(chunks)))
      }
    })
    req.on("error", () => {
      if (!done) {
        done = true
        resume(bail("connection closed while receiving the request body"))
      }
    })
  })

export const start = (config: ServerConfig): Effect.Effect<Running, Error> =>
  Effect.gen(function*() {
    const runtime = yield* Effect.runtime<never>()
    const runFork = Runtime.runFork(runtime)
    const stats = emptyStats()
    const log: Array<RequestRecord> = []
    const state: ServerState = {
      stats,
      groupLocks: new Set(),
      snapshotLocks: new Map(),
      now: () => Math.floor(Date.now() / 1000)
    }
    const stores = new Map(config.stores.map((store) => [store.name, store]))
    for (const store of config.stores) yield* Effect.mapError(Datastore.init(store), (e) => new Error(e.text))
    const auth = Auth.makeAuthenticator(config.users, config.tokens)
    const connectionIds = new WeakMap<net.Socket, number>()
    let connectionCounter = 0
    const sessions = new Set<{ readonly socket: net.Socket; readonly close: () => void }>()

    const record = (socket: net.Socket, entry: Omit<RequestRecord, "connection">): "drop" | undefined => {
      const query = new URLSearchParams(entry.query)
      query.delete("password")
      const full: RequestRecord = { connection: connectionIds.get(socket) ?? 0, ...entry, query: query.toString() }
      log.push(full)
      return config.onRequest?.(full)
    }

    const lookupStore = (name: string) =>
      Effect.suspend(() => {
        const store = stores.get(name)
        return store === undefined ? bail(`datastore '${name}' does not exist`) : Effect.succeed(store)
      })

    const authenticate = (headers: http.IncomingHttpHeaders, method: string) =>
      Effect.suspend(() => {
        const result = auth.authenticate(headers, method, state.now())
        if (Either.isLeft(result)) stats.authFailures += 1
        return result
      })

    // ---- HTTP/1.1 API ------------------------------------------------------------------------

    const requestParams = (req: http.IncomingMessage, url: URL) =>
      Effect.gen(function*() {
        const type = (req.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase()
        const body = yield* collectBody(req, 512 * 1024)
        if (type === "application/json") {
          const fromBody = yield* Params.fromJson(body)
          return Params.fromSearch(url.searchParams, fromBody)
        }
        return Params.fromSearch(new URLSearchParams(body.toString("utf8")), Params.fromSearch(url.searchParams))
      })

    const login = (req: http.IncomingMessage, url: URL) =>
      Effect.gen(function*() {
        const params = yield* requestParams(req, url)
        const username = yield* Params.string(params, "username")
        const password = yield* Params.string(params, "password")
        const result = auth.login(username, password, state.now())
        if (Either.isLeft(result)) {
          stats.authFailures += 1
          return yield* Effect.fail(result.left)
        }
        stats.ticketLogins += 1
        return {
          username: result.right.username,
          ticket: result.right.ticket,
          CSRFPreventionToken: result.right.csrf
        }
      })

    const groupsOf = (store: Datastore.Datastore, ns: ReadonlyArray<string>) => {
      const base = Datastore.namespaceDir(store, ns)
      const out: Array<{ type: Snapshot.BackupType; id: string; dir: string }> = []
      for (const type of ["vm", "ct", "host"] as const) {
        let ids: Array<string> = []
        try {
          ids = fs.readdirSync(path.join(base, type))
        } catch {
          ids = []
        }
        for (const id of ids.sort()) {
          if (Snapshot.isSafeId(id)) out.push({ type, id, dir: path.join(base, type, id) })
        }
      }
      return out
    }

    const canSee = (identity: Auth.Identity, owner: string | undefined) =>
      identity.privileges.has("Datastore.Read") ||
      (identity.privileges.has("Datastore.Backup") && owner !== undefined && Auth.isOwner(identity, owner))

    const snapshotSummary = (group: { type: string; id: string; dir: string }, info: Datastore.SnapshotInfo) =>
      Effect.gen(function*() {
        const owner = Datastore.readOwner(group.dir)
        if (!info.finished) {
          return {
            "backup-type": group.type,
            "backup-id": group.id,
            "backup-time": info.time,
            files: fs.readdirSync(info.dir).map((filename) => ({ filename })),
            owner
          }
        }
        const manifest = yield* Datastore.loadManifest(info.dir)
        return {
          "backup-type": group.type,
          "backup-id": group.id,
          "backup-time": info.time,
          files: [
            ...manifest.files.map((f) => ({ filename: f.filename, size: f.size, "crypt-mode": f["crypt-mode"] })),
            { filename: Manifest.MANIFEST_BLOB_NAME, "crypt-mode": manifest.signature === null ? "none" : "sign-only" }
          ],
          size: manifest.files.reduce((sum, f) => sum + f.size, 0),
          owner,
          protected: fs.existsSync(path.join(info.dir, ".protected")),
          ...(typeof manifest.unprotected["key-fingerprint"] === "string"
            ? { fingerprint: manifest.unprotected["key-fingerprint"] }
            : {}),
          ...(manifest.unprotected["verify_state"] !== undefined
            ? { verification: manifest.unprotected["verify_state"] }
            : {})
        }
      })

    const listGroups = (identity: Auth.Identity, store: Datastore.Datastore, params: Params.Params) =>
      Effect.gen(function*() {
        const ns = yield* Params.namespace(params)
        const out: Array<unknown> = []
        for (const group of groupsOf(store, ns)) {
          const owner = Datastore.readOwner(group.dir)
          if (!canSee(identity, owner)) continue
          const finished = Datastore.listSnapshots(group.dir).filter((s) => s.finished)
          const last = finished[finished.length - 1]
          out.push({
            "backup-type": group.type,
            "backup-id": group.id,
            "last-backup": last?.time ?? 0,
            "backup-count": finished.length,
            owner,
            files: last === undefined ? [] : (yield* Datastore.loadManifest(last.dir)).files.map((f) => f.filename)
          })
        }
        return out
      })

    const listSnapshots = (identity: Auth.Identity, store: Datastore.Datastore, params: Params.Params) =>
      Effect.gen(function*() {
        const ns = yield* Params.namespace(params)
        const type = yield* Params.optionalString(params, "backup-type")
        const id = yield* Params.optionalString(params, "backup-id")
        const out: Array<unknown> = []
        for (const group of groupsOf(store, ns)) {
          if ((type !== undefined && group.type !== type) || (id !== undefined && group.id !== id)) continue
          if (!canSee(identity, Datastore.readOwner(group.dir))) continue
          for (const info of Datastore.listSnapshots(group.dir)) out.push(yield* snapshotSummary(group, info))
        }
        return out
      })

    const uploadBackupLog = (
      identity: Auth.Identity,
      store: Datastore.Datastore,
      req: http.IncomingMessage,
      url: URL
    ) =>
      Effect.gen(function*() {
        const params = Params.fromSearch(url.searchParams)
        const id = yield* Params.snapshotId(params)
        if (!identity.privileges.has("Datastore.Backup")) return yield* bail("permission check failed", 403)
        const group = Datastore.groupDir(store, Snapshot.parseNamespace(id.ns) ?? [], id.backupType, id.backupId)
        const owner = Datastore.readOwner(group)
        if (owner === undefined || !Auth.isOwner(identity, owner)) {
          return yield* bail(`backup owner check failed (${identity.authId} != ${owner ?? "none"})`)
        }
        const dir = Datastore.snapshotDir(store, id)
        if (!fs.existsSync(path.join(dir, Manifest.MANIFEST_BLOB_NAME))) {
          return yield* bail(`snapshot ${Datastore.snapshotName(id)} does not exist.`)
        }
        const file = path.join(dir, "client.log.blob")
        if (fs.existsSync(file)) return yield* bail("backup already contains a log.")
        const data = yield* collectBody(req, 16 * 1024 * 1024 + DataBlob.ENCRYPTED_HEADER_SIZE)
        const verified = DataBlob.verify(data)
        if (Either.isLeft(verified)) return yield* bail(verified.left.detail)
        yield* attempt(`unable to write ${JSON.stringify(file)}`, () => Datastore.writeAtomic(file, data))
        return null
      })

    const createNamespace = (
      identity: Auth.Identity,
      store: Datastore.Datastore,
      req: http.IncomingMessage,
      url: URL
    ) =>
      Effect.gen(function*() {
        if (!identity.privileges.has("Datastore.Backup")) return yield* bail("permission check failed", 403)
        const params = yield* requestParams(req, url)
        const name = yield* Params.string(params, "name")
        const parent = (yield* Params.optionalString(params, "parent")) ?? ""
        const parts = Snapshot.parseNamespace(parent === "" ? name : `${parent}/${name}`)
        if (parts === undefined || !Snapshot.isSafeId(name)) return yield* bail(`invalid namespace '${name}'`)
        const parentDir = Datastore.namespaceDir(store, parts.slice(0, -1))
        if (!fs.existsSync(parentDir)) {
          return yield* bail(`cannot create new namespace, parent ${parent} doesn't already exists`)
        }
        const dir = Datastore.namespaceDir(store, parts)
        if (fs.existsSync(dir)) return yield* bail(`namespace '${parts.join("/")}' already exists`)
        yield* attempt("unable to create namespace", () => fs.mkdirSync(dir, { recursive: true }))
        return parts.join("/")
      })

    const handleApi = (req: http.IncomingMessage, url: URL): Effect.Effect<unknown, ApiError> =>
      Effect.gen(function*() {
        const method = req.method ?? "GET"
        const p = url.pathname
        if (p === `${API}/access/ticket` && method === "POST") return yield* login(req, url)
        const identity = yield* authenticate(req.headers, method)
        if (p === `${API}/version` && method === "GET") {
          return { version: "3.2.4", release: "1", repoid: "vzdump-ts-test-server" }
        }
        if (p === `${API}/backup` || p === `${API}/reader`) return yield* bail("missing Upgrade header")
        if (p === `${API}/admin/datastore` && method === "GET") {
          return config.stores.map((store) => ({ store: store.name }))
        }
        const m = new RegExp(`^${API}/admin/datastore/([^/]+)/(groups|snapshots|upload-backup-log|namespace)$`).exec(p)
        if (m !== null) {
          const store = yield* lookupStore(decodeURIComponent(m[1]!))
          switch (`${method} ${m[2]}`) {
            case "GET groups":
              return yield* listGroups(identity, store, Params.fromSearch(url.searchParams))
            case "GET snapshots":
              return yield* listSnapshots(identity, store, Params.fromSearch(url.searchParams))
            case "POST upload-backup-log":
              return yield* uploadBackupLog(identity, store, req, url)
            case "POST namespace":
              return yield* createNamespace(identity, store, req, url)
          }
          return yield* bail(`Method '${method}' not allowed.`, 405)
        }
        return yield* bail(`Path '${p}' not found.`, 404)
      })

    const onRequest = (req: http.IncomingMessage, res: http.ServerResponse) => {
      stats.httpRequests += 1
      const url = normalizePath(req.url ?? "/")
      const socket = req.socket
      const verdict = record(socket, {
        protocol: "api",
        method: req.method ?? "GET",
        path: url.pathname,
        query: url.search
      })
      if (verdict === "drop") {
        socket.destroy()
        return
      }
      runFork(
        handleApi(req, url).pipe(
          Effect.match({
            onFailure: (error) => {
              res.writeHead(error.status, { "content-type": H2.JSON_CONTENT_TYPE })
              res.end(error.text)
            },
            onSuccess: (data) => {
              res.writeHead(200, { "content-type": H2.JSON_CONTENT_TYPE })
              res.end(JSON.stringify({ data: data ?? null }))
            }
          })
        )
      )
    }

    // ---- upgrades ------------------------------------------------------------------------------

    const upgradeBackup = (identity: Auth.Identity, req: http.IncomingMessage, params: Params.Params) =>
      Effect.gen(function*() {
        const storeName = yield* Params.string(params, "store")
        const id = yield* Params.snapshotId(params)
        const ns = Snapshot.parseNamespace(id.ns) ?? []
        const benchmark = yield* Params.optionalBoolean(params, "benchmark")
        yield* Params.optionalBoolean(params, "debug")
        if (!identity.privileges.has("Datastore.Backup")) return yield* bail("permission check failed", 403)
        const store = yield* lookupStore(storeName)
        if (req.headers.upgrade !== BACKUP_PROTOCOL) return yield* bail("invalid protocol name")
        if (!fs.existsSync(Datastore.namespaceDir(store, ns))) return yield* bail("namespace not found", 404)
        const isBenchmarkGroup = id.backupType === "host" && id.backupId === "benchmark"
        if (isBenchmarkGroup && !benchmark) return yield* bail("unable to run benchmark without --benchmark flags")
        if (!isBenchmarkGroup && benchmark) return yield* bail("benchmark flags is only allowed on 'host/benchmark'")
        const group = Datastore.groupDir(store, ns, id.backupType, id.backupId)
        const groupLock = `${store.name}:${group}`
        if (state.groupLocks.has(groupLock)) {
          return yield* bail(
            `unable to acquire lock on backup group directory ${
              JSON.stringify(group)
            } - another backup is already running`
          )
        }
        yield* attempt(`unable to create backup group ${JSON.stringify(group)}`, () => {
          fs.mkdirSync(group, { recursive: true })
          if (Datastore.readOwner(group) === undefined) {
            fs.writeFileSync(path.join(group, "owner"), `${identity.authId}\n`)
          }
        })
        const owner = Datastore.readOwner(group) ?? ""
        if (!Auth.isOwner(identity, owner) && !isBenchmarkGroup) {
          return yield* bail(`backup owner check failed (${identity.authId} != ${owner})`)
        }
        const lastBackup = yield* Datastore.lastBackup(group)
        if (lastBackup !== undefined) {
          if (id.backupTime <= lastBackup.time) return yield* bail("backup timestamp is older than last backup.")
          if (state.snapshotLocks.get(lastBackup.dir) === -1) {
            return yield* bail("base snapshot is already locked by another operation")
          }
        }
        const dir = Datastore.snapshotDir(store, id)
        if (fs.existsSync(dir)) return yield* bail("backup directory already exists.")
        yield* attempt(`unable to create snapshot directory ${JSON.stringify(dir)}`, () => fs.mkdirSync(dir))
        state.groupLocks.add(groupLock)
        state.snapshotLocks.set(dir, -1)
        if (lastBackup !== undefined) {
          state.snapshotLocks.set(lastBackup.dir, (state.snapshotLocks.get(lastBackup.dir) ?? 0) + 1)
        }
        stats.backupSessions += 1
        return BackupSession.make({ store, identity, snapshot: id, dir, groupLock, lastBackup, benchmark }, state)
      })

    const upgradeReader = (identity: Auth.Identity, req: http.IncomingMessage, params: Params.Params) =>
      Effect.gen(function*() {
        const storeName = yield* Params.string(params, "store")
        const id = yield* Params.snapshotId(params)
        yield* Params.optionalBoolean(params, "debug")
        const canRead = identity.privileges.has("Datastore.Read")
        if (!canRead && !identity.privileges.has("Datastore.Backup")) {
          return yield* bail(`no permissions on /datastore/${storeName}`)
        }
        const store = yield* lookupStore(storeName)
        if (req.headers.upgrade !== READER_PROTOCOL) return yield* bail("invalid protocol name")
        const ns = Snapshot.parseNamespace(id.ns) ?? []
        if (!canRead) {
          const owner = Datastore.readOwner(Datastore.groupDir(store, ns, id.backupType, id.backupId))
          if (owner === undefined || !Auth.isOwner(identity, owner)) return yield* bail("backup owner check failed!")
        }
        const dir = Datastore.snapshotDir(store, id)
        if (!fs.existsSync(dir)) return yield* bail(`snapshot ${Datastore.snapshotName(id)} does not exist.`)
        if (state.snapshotLocks.get(dir) === -1) {
          return yield* bail(
            `unable to acquire shared lock on snapshot directory ${JSON.stringify(dir)} - locked by another operation`
          )
        }
        state.snapshotLocks.set(dir, (state.snapshotLocks.get(dir) ?? 0) + 1)
        stats.readerSessions += 1
        return ReaderSession.make({ store, dir }, state)
      })

    const serveSession = (
      socket: tls.TLSSocket,
      head: Buffer,
      protocol: "backup" | "reader",
      session: { readonly route: BackupSession.BackupSession["route"]; readonly close: () => void }
    ) => {
      const entry = { socket, close: session.close }
      sessions.add(entry)
      const closeSession = () => {
        sessions.delete(entry)
        session.close()
      }
      socket.once("close", closeSession)
      const serve = () =>
        H2.serve(socket, head, {
          onClose: closeSession,
          onStream: (stream, request) => {
            stats.h2Requests += 1
            const verdict = record(socket, {
              protocol,
              method: request.method,
              path: request.path,
              query: request.query.toString()
            })
            if (verdict === "drop") {
              socket.destroy()
              return
            }
            runFork(
              session.route(request).pipe(
                Effect.match({
                  onFailure: (error) => H2.respond(stream, error),
                  onSuccess: (reply) => H2.respond(stream, reply)
                })
              )
            )
          }
        })
      // HTTP/2 takes the socket over once the 101 answer is out (see `H2.serve`)
      socket.write(
        `HTTP/1.1 101 Switching Protocols\r\nUpgrade: ${
          protocol === "backup" ? BACKUP_PROTOCOL : READER_PROTOCOL
        }\r\nConnection: upgrade\r\n\r\n`,
        (error) => {
          if (error === undefined || error === null) {
            if (!socket.destroyed) serve()
          } else socket.destroy()
        }
      )
    }

    const onUpgrade = (req: http.IncomingMessage, rawSocket: net.Socket, head: Buffer) => {
      const socket = rawSocket as tls.TLSSocket
      stats.httpRequests += 1
      socket.on("error", () => {})
      const url = normalizePath(req.url ?? "/")
      const protocol = url.pathname === `${API}/backup`
        ? "backup"
        : url.pathname === `${API}/reader`
        ? "reader"
        : undefined
      const verdict = record(socket, {
        protocol: "api",
        method: req.method ?? "GET",
        path: url.pathname,
        query: url.search
      })
      if (verdict === "drop") {
        socket.destroy()
        return
      }
      const program = Effect.gen(function*() {
        if (protocol === undefined) return yield* bail(`Path '${url.pathname}' not found.`, 404)
        if ((req.method ?? "GET") !== "GET") return yield* bail(`Method '${req.method}' not allowed.`, 405)
        const identity = yield* authenticate(req.headers, "GET")
        const params = Params.fromSearch(url.searchParams)
        if (protocol === "backup") {
          const session = yield* upgradeBackup(identity, req, params)
          serveSession(socket, head, "backup", session)
        } else {
          const session = yield* upgradeReader(identity, req, params)
          serveSession(socket, head, "reader", session)
        }
      })
      runFork(program.pipe(Effect.catchAll((error) => Effect.sync(() => writeHttpError(socket, error)))))
    }

    const server = https.createServer({ key: config.certificate.keyPem, cert: config.certificate.certPem })
    server.on("secureConnection", (socket: tls.TLSSocket) => {
      stats.tlsConnections += 1
      connectionIds.set(socket, ++connectionCounter)
      socket.on("error", () => {})
    })
    server.on("connection", () => {
      stats.tcpConnections += 1
    })
    server.on("tlsClientError", () => {})
    server.on("request", onRequest)
    server.on("upgrade", onUpgrade)

    const port = yield* Effect.async<number, Error>((resume) => {
      const onError = (error: Error) => resume(Effect.fail(error))
      server.once("error", onError)
      server.listen(config.port, config.host, () => {
        server.off("error", onError)
        resume(Effect.succeed((server.address() as net.AddressInfo).port))
      })
    })

    const dropConnections = () => {
      const all = [...sessions]
      for (const session of all) session.socket.destroy()
      return all.length
    }

    const close = Effect.async<void>((resume) => {
      dropConnections()
      server.close(() => resume(Effect.void))
      server.closeAllConnections()
    })

    return {
      port,
      stats,
      log,
      dropConnections,
      activeSessions: () => sessions.size,
      close
    }
  })
