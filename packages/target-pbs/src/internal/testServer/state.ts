/**
 * Server-wide state of the test server shared by its sessions: counters, locks, the request log.
 */

/** Counters a test can assert on. */
export interface MutableStats {
  tcpConnections: number
  tlsConnections: number
  httpRequests: number
  authFailures: number
  ticketLogins: number
  backupSessions: number
  readerSessions: number
  h2Requests: number
  chunkUploads: number
  chunkUploadBytes: number
  duplicateChunks: number
  blobUploads: number
  finishedSnapshots: number
  removedSnapshots: number
  chunkDownloads: number
}

export const emptyStats = (): MutableStats => ({
  tcpConnections: 0,
  tlsConnections: 0,
  httpRequests: 0,
  authFailures: 0,
  ticketLogins: 0,
  backupSessions: 0,
  readerSessions: 0,
  h2Requests: 0,
  chunkUploads: 0,
  chunkUploadBytes: 0,
  duplicateChunks: 0,
  blobUploads: 0,
  finishedSnapshots: 0,
  removedSnapshots: 0,
  chunkDownloads: 0
})

export interface ServerState {
  readonly stats: MutableStats
  /** Groups with a running backup (`<store>:<group dir>`). */
  readonly groupLocks: Set<string>
  /** Snapshot directories: -1 = being written, n > 0 = n readers. */
  readonly snapshotLocks: Map<string, number>
  /** Epoch seconds. */
  readonly now: () => number
}
