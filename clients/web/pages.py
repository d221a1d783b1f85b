"""The web console's two pages, as self-contained HTML (no scripts or styles from elsewhere): the overview, which
fetches ``/api/vms`` and the thumbnails once a second while it is visible, and the login form."""

from __future__ import annotations

import html

_STYLE = """
body { font: 15px system-ui, sans-serif; margin: 0; background: #f3f4f6; color: #111827; }
header { background: #1e3a8a; color: white; padding: 10px 20px; font-size: 18px; }
main { padding: 20px; display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 16px; }
.vm { background: white; border-radius: 8px; box-shadow: 0 1px 3px #0003; padding: 10px; }
.vm h2 { font-size: 16px; margin: 0 0 6px; display: flex; justify-content: space-between; }
.state { font-size: 13px; padding: 1px 8px; border-radius: 10px; background: #e5e7eb; }
.state.running { background: #bbf7d0; } .state.paused { background: #fde68a; }
.state.stopped, .state.shutdown, .state.crashed { background: #fecaca; }
.shot { width: 320px; height: 180px; background: #111; display: block; object-fit: contain; }
.meta { font-size: 13px; color: #4b5563; margin-top: 6px; }
a { color: #1d4ed8; }
form { margin: 80px auto; width: 360px; background: white; padding: 24px; border-radius: 8px; }
input { width: 100%; box-sizing: border-box; padding: 6px; margin: 8px 0; }
"""

_OVERVIEW_SCRIPT = """
const grid = document.querySelector('main');
const cards = new Map();
function card(vm) {
  let c = cards.get(vm.name);
  if (!c) {
    c = document.createElement('section');
    c.className = 'vm';
    c.dataset.vm = vm.name;
    c.innerHTML = '<h2><span class="name"></span><span class="state"></span></h2>' +
      '<a class="open"><img class="shot" alt=""></a><div class="meta"></div>';
    c.querySelector('.name').textContent = vm.name;
    grid.appendChild(c);
    cards.set(vm.name, c);
  }
  return c;
}
function refresh() {
  if (document.visibilityState !== 'visible') return;
  fetch('/api/vms', {cache: 'no-store'}).then(r => r.ok ? r.json() : []).then(vms => {
    const names = new Set(vms.map(vm => vm.name));
    for (const [name, c] of cards) if (!names.has(name)) { c.remove(); cards.delete(name); }
    for (const vm of vms) {
      const c = card(vm);
      const state = c.querySelector('.state');
      state.textContent = vm.state;
      state.className = 'state ' + vm.state;
      c.querySelector('.meta').textContent = (vm.size ? vm.size.join('x') : 'no display') +
        (vm.console ? '' : ' - no console');
      const link = c.querySelector('.open');
      if (vm.console) link.href = vm.console; else link.removeAttribute('href');
      const img = c.querySelector('.shot');
      if (vm.screen && !img.dataset.loading) {
        img.dataset.loading = '1';
        const next = new Image();
        next.onload = () => { img.src = next.src; delete img.dataset.loading; };
        next.onerror = () => { delete img.dataset.loading; };
        next.src = vm.screen + '?width=320&t=' + Date.now();
      } else if (!vm.screen) {
        img.removeAttribute('src');
      }
    }
    document.body.dataset.refreshed = String(Date.now());
  }).catch(() => {});
}
refresh();
setInterval(refresh, 1000);
document.addEventListener('visibilitychange', refresh);
"""


def overview() -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vmfront: virtual machines</title>"
            f"<style>{_STYLE}</style></head><body><header>vmfront &mdash; virtual machines</header><main></main>"
            f"<script>{_OVERVIEW_SCRIPT}</script></body></html>")


def login(failed: bool) -> str:
    problem = "<p style='color:#b91c1c'>That token opens nothing here (wrong or expired).</p>" if failed else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vmfront: sign in</title>"
            f"<style>{_STYLE}</style></head><body><header>vmfront</header>"
            f"<form method='post' action='/login'><label>Console token<input name='token' type='password' "
            f"autocomplete='off' autofocus></label>{problem}<button type='submit'>Open</button>"
            f"<p class='meta'>Tokens come from the operator ({html.escape('TOKEN: VMNAME')} lines of the "
            f"client's token file).</p></form></body></html>")


__all__ = ["login", "overview"]
