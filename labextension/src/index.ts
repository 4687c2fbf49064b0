/*
 * nsprovisioner in JupyterLab: a status-bar item for the current kernel's
 * sandbox (network, memory used / limit, processes), and notifications for
 * what Jupyter alone reports as a dead kernel or a long log line: a kernel
 * killed by a limit, a start that failed, a start without some limits.
 *
 * Everything comes from the server extension nsprovisioner.server_extension,
 * through ServerConnection (the same token and XSRF cookie as /api/kernels).
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ISessionContext, Notification, showDialog } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

// Often enough to watch a cell fill memory; one small request per tab.
const POLL_MS = 2000;

/** GET /nsprovisioner/kernels/<id> */
interface ISandboxStatus {
  state: string;
  sandboxed: boolean | null;
  network?: string;
  memory_limit_bytes?: number | null;
  pids_limit?: number | null;
  cpu_limit?: number | null;
  memory_bytes?: number | null;
  pids?: number | null;
  pids_limit_hits?: number | null; // forks and clones the pids limit refused
}

/** One entry of GET /nsprovisioner/events (kernel_events.py) */
interface IKernelEvent {
  id: number;
  kernel_id: string;
  kernelspec: string;
  kind: 'killed' | 'start-failed' | 'degraded';
  message: string;
  fix: string | null;
  time: number; // seconds since the epoch, the server's clock
}

interface IEventsReply {
  last: number;
  events: IKernelEvent[];
}

async function getJSON<T>(
  settings: ServerConnection.ISettings,
  path: string
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'nsprovisioner', path);
  const response = await ServerConnection.makeRequest(url, {}, settings);
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response);
  }
  return (await response.json()) as T;
}

function mib(bytes: number): string {
  return (bytes / 2 ** 20).toFixed(0);
}

/** "used/limit unit", "used unit" without a limit, or "" when not counted */
function usedOf(
  used: number | null | undefined,
  limit: number | null | undefined,
  show: (n: number) => string,
  unit: string
): string {
  if (used === null || used === undefined) {
    return limit ? `limit ${show(limit)}${unit}` : '';
  }
  return limit ? `${show(used)}/${show(limit)}${unit}` : `${show(used)}${unit} (no limit)`;
}

/** The status item's text and its tooltip. */
export function describe(status: ISandboxStatus): [string, string] {
  if (status.sandboxed === false) {
    return ['not sandboxed', 'This kernel runs on the host, outside any sandbox'];
  }
  if (status.sandboxed === null) {
    return ['sandbox: no kernel process', 'The kernel is starting, dead or gone'];
  }
  const memory = usedOf(status.memory_bytes, status.memory_limit_bytes, mib, ' MiB');
  const pids = usedOf(status.pids, status.pids_limit, String, '');
  const parts = [`sandboxed`, `net: ${status.network}`];
  if (memory) {
    parts.push(`mem ${memory}`);
  }
  if (pids) {
    parts.push(`pids ${pids}` + (status.pids_limit_hits ? ' (limit hit)' : ''));
  }
  if (status.cpu_limit) {
    parts.push(`cpu ${status.cpu_limit}`);
  }
  const tooltip =
    'Kernel sandboxed by nsprovisioner\n' +
    `network: ${status.network}\n` +
    `memory: ${memory || 'not counted'}\n` +
    `processes: ${pids || 'not counted'}` +
    (status.pids_limit_hits
      ? `, ${status.pids_limit_hits} refused by the limit\n`
      : '\n') +
    `cpu limit: ${status.cpu_limit ? status.cpu_limit + ' cores' : 'none'}`;
  return [parts.join(' · '), tooltip];
}

/** The kernel of the notebook or console in front, if any. */
function currentKernelId(shell: ILabShell): string | null {
  const widget = shell.currentWidget as
    | (Widget & { sessionContext?: ISessionContext })
    | null;
  return widget?.sessionContext?.session?.kernel?.id ?? null;
}

class SandboxStatusItem extends Widget {
  constructor() {
    super();
    this.addClass('nsprov-StatusItem');
    this.node.textContent = '';
  }

  show_(status: ISandboxStatus | null): void {
    if (status === null) {
      this.node.textContent = '';
      this.node.title = '';
      this.node.dataset.sandboxed = '';
      return;
    }
    const [text, tooltip] = describe(status);
    this.node.textContent = text;
    this.node.title = tooltip;
    this.node.dataset.sandboxed = String(status.sandboxed);
  }
}

/** A dialog with the whole text: the cause, wrapped, and the fix on its own line. */
function showDetails(event: IKernelEvent): void {
  const body = new Widget();
  body.addClass('nsprov-Details');
  const cause = document.createElement('pre');
  cause.textContent = event.message;
  body.node.appendChild(cause);
  if (event.fix) {
    const fix = document.createElement('pre');
    fix.className = 'nsprov-Fix';
    fix.textContent = event.fix;
    body.node.appendChild(fix);
  }
  void showDialog({ title: `Kernel ${event.kernelspec}`, body, buttons: [] });
}

function notify(event: IKernelEvent): void {
  const type = event.kind === 'degraded' ? 'warning' : 'error';
  const message =
    event.kind === 'start-failed'
      ? `${event.kernelspec} could not start in its sandbox`
      : event.message;
  Notification.emit(message, type, {
    autoClose: false,
    actions: [{ label: 'Details', callback: () => showDetails(event) }]
  });
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'nsprovisioner-lab:plugin',
  description: 'The sandbox of the current kernel in the status bar, and why a kernel died',
  autoStart: true,
  requires: [ILabShell],
  optional: [IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    statusBar: IStatusBar | null
  ): void => {
    const settings = app.serviceManager.serverSettings;
    const item = new SandboxStatusItem();
    let kernelId: string | null = null;
    if (statusBar) {
      statusBar.registerStatusItem('nsprovisioner-lab:sandbox', {
        item,
        align: 'left',
        rank: 5,
        // empty without a kernel: the status bar asks before our first answer
        isActive: () => true
      });
    }
    let lastEvent: number | null = null;
    // Events from before this page are not news, except those of the moments it
    // took to load: a notebook opened with the page can fail to start before the
    // first poll. (Clocks of browser and server are assumed within seconds.)
    const notBefore = Date.now() / 1000 - 10;
    const refusals = new Map<string, number>(); // pids_limit_hits seen, per kernel

    // The pids limit refuses a fork without killing anyone: the code sees EAGAIN
    // ("Resource temporarily unavailable"), the user sees why here.
    const noticePidsLimit = (id: string, status: ISandboxStatus | null): void => {
      const hits = status?.pids_limit_hits ?? 0;
      if (hits > (refusals.get(id) ?? 0)) {
        const refused = hits - (refusals.get(id) ?? 0);
        Notification.warning(
          `The kernel reached its pids limit (${status?.pids_limit}): ` +
            (refused === 1
              ? 'a new process or thread was refused'
              : `${refused} new processes or threads were refused`),
          { autoClose: 10000 }
        );
      }
      refusals.set(id, hits);
    };

    const refresh = async (): Promise<void> => {
      kernelId = currentKernelId(shell);
      let status: ISandboxStatus | null = null;
      if (kernelId !== null) {
        try {
          status = await getJSON<ISandboxStatus>(settings, `kernels/${kernelId}`);
        } catch {
          status = null; // a kernel still starting, or already gone
        }
      }
      item.show_(status);
      if (kernelId !== null) {
        noticePidsLimit(kernelId, status);
      }
      const reply = await getJSON<IEventsReply>(settings, `events?after=${lastEvent ?? 0}`);
      reply.events
        .filter(event => lastEvent !== null || event.time >= notBefore)
        .forEach(notify);
      lastEvent = reply.last;
    };
    // One refresh at a time: two in flight would both notify the same events.
    let latest: Promise<void> = Promise.resolve();
    const refreshInTurn = (): Promise<void> => {
      latest = latest.then(refresh).catch(reason => {
        console.warn('nsprovisioner-lab: no sandbox status from the server', reason);
      });
      return latest;
    };
    const loop = async (): Promise<void> => {
      await refreshInTurn();
      window.setTimeout(loop, POLL_MS);
    };
    shell.currentChanged.connect(() => void refreshInTurn());
    void loop();
  }
};

export default plugin;
