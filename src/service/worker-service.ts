import type { Database } from '../db/connect.js';
import { queueFigures } from '../sql/queue.js';
import { type ServiceServer, startServiceServer } from './http.js';
import { WorkerMetrics } from './metrics.js';
import { workerReadiness } from './readiness.js';

/**
 * A worker's /metrics, /healthz and /readyz, for one (provider, model). The
 * embed command imports this module only when --metrics-port is given, so
 * prom-client is loaded by the runs that serve metrics and no others.
 */
export async function startWorkerService(
  database: Database,
  target: { provider: string; model: string },
  listen: { host: string; port: number },
): Promise<{ metrics: WorkerMetrics; server: ServiceServer }> {
  const metrics = new WorkerMetrics(target, () => queueFigures(database.db, target));
  const server = await startServiceServer({
    ...listen,
    registry: metrics.registry,
    ready: workerReadiness(database, { failing: () => metrics.providerFailing() }),
  });
  return { metrics, server };
}
