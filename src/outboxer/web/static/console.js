// outboxer console: the overview's chart, "select all", confirmations. No inline
// scripts anywhere (the Content-Security-Policy allows only these files).
(function () {
  "use strict";

  function chart(el) {
    var plot = null;
    var colors = { published: "#3b6fd1", consumed: "#2e9e5b", failed: "#d23b3b" };
    function opts(width) {
      return {
        width: width,
        height: 260,
        scales: { x: { time: true } },
        axes: [{}, { label: "rows per minute" }],
        series: [
          {},
          { label: "published", stroke: colors.published, width: 2 },
          { label: "consumed", stroke: colors.consumed, width: 2 },
          { label: "failed", stroke: colors.failed, width: 2 },
        ],
      };
    }
    function load() {
      fetch(el.dataset.src, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (doc) {
          var data = [doc.t, doc.published, doc.consumed, doc.failed];
          if (plot === null) {
            plot = new uPlot(opts(Math.max(320, el.clientWidth)), data, el);
          } else {
            plot.setData(data);
          }
          el.dataset.ready = "1";
          el.dataset.points = String(doc.t.length);
        })
        .catch(function () { el.dataset.error = "1"; });
    }
    load();
    setInterval(load, 5000);
    window.addEventListener("resize", function () {
      if (plot !== null) { plot.setSize({ width: Math.max(320, el.clientWidth), height: 260 }); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var el = document.getElementById("activity");
    if (el && window.uPlot) { chart(el); }
    var all = document.getElementById("select-all");
    if (all) {
      all.addEventListener("change", function () {
        document.querySelectorAll("input[name=ids]").forEach(function (box) {
          box.checked = all.checked;
        });
      });
    }
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); }
      });
    });
  });
})();
