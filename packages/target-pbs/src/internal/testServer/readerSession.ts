/**
 * One reader connection of the test server (`proxmox-backup-reader-protocol-v1`, spec §6.9):
 * `download` (an index download registers its chunks), `chunk` (only registered digests) and
 * `speedtest`.
 */
import * as fs from "node:fs"
import * as path from "node:path"
import * as Effect from "effect/Effect"
import { type ApiError, attempt, bail } from "./apiError.js"
import * as Datastore from "./datastore.js"
import * as H2 from "./h2.js"
import * as Params from "./params.js"
import type { ServerState } from "./state.js"

export interface ReaderEnv {
  readonly store: Datastore.Datastore
  readonly dir: string
}

export interface ReaderSession {
  readonly route: (request: H2.H2Request) => Effect.Effect<H2.Reply, ApiError>
  readonly close: () => void
}

export const make = (env: ReaderEnv, server: ServerState): ReaderSession => {
  const allowed = new Set<string>()
  let closed = false

  const download = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const name = yield* Params.archiveName(Params.fromSearch(request.query), "file-name")
      const file = path.join(env.dir, name)
      if (name.endsWith(".fidx") || name.endsWith(".didx")) {
        const chunks = yield* Datastore.readIndexChunks(file, name)
        for (const chunk of chunks) allowed.add(chunk.digest)
      }
      return H2.bytes(yield* Datastore.readForDownload(file))
    })

  const chunk = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const digest = yield* Params.string(Params.fromSearch(request.query), "digest", Params.DIGEST)
      if (!allowed.has(digest)) return yield* bail(`download chunk ${digest} not allowed`, 401)
      const file = Datastore.chunkPath(env.store, digest)
      const data = yield* attempt(`reading file ${JSON.stringify(file)} failed`, () => fs.readFileSync(file))
      server.stats.chunkDownloads += 1
      return H2.bytes(data)
    })

  const routes: Record<string, H2.Routes> = {
    "/": { GET: () => Effect.succeed(H2.json(["chunk", "download", "speedtest"].map((subdir) => ({ subdir })))) },
    "/download": { GET: download },
    "/chunk": { GET: chunk },
    "/speedtest": { GET: () => Effect.succeed(H2.bytes(Buffer.alloc(1024 * 1024, 65))) }
  }

  return {
    route: (request) => H2.dispatch(routes, request),
    close: () => {
      if (closed) return
      closed = true
      const readers = (server.snapshotLocks.get(env.dir) ?? 1) - 1
      if (readers > 0) server.snapshotLocks.set(env.dir, readers)
      else server.snapshotLocks.delete(env.dir)
    }
  }
}
