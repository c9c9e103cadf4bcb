// Wayfinder status page: keeps the charts live. The server draws them (SVG,
// supervisor/charts.rs); this only fetches a fresh copy of the section every
// step and swaps it in. Nothing from the server is evaluated: DOMParser makes
// inert nodes, and the page's CSP forbids inline script anyway.
(function () {
  "use strict";
  var section = document.getElementById("charts");
  if (!section || !window.fetch || !window.DOMParser) {
    return;
  }
  var src = section.getAttribute("data-src");
  var step = parseInt(section.getAttribute("data-step-ms"), 10) || 2000;
  var busy = false;
  function refresh() {
    if (busy || document.hidden) {
      return;
    }
    busy = true;
    fetch(src, { cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) {
          throw new Error("charts: " + r.status);
        }
        return r.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("charts");
        if (fresh) {
          section.replaceChildren.apply(section, Array.prototype.slice.call(fresh.childNodes));
          section.removeAttribute("data-stale");
          section.setAttribute("data-refreshed", String(Date.now()));
        }
      })
      .catch(function () {
        // The appliance restarting, or the network: keep the last picture, marked.
        section.setAttribute("data-stale", "1");
      })
      .then(function () {
        busy = false;
      });
  }
  window.setInterval(refresh, step);
})();
