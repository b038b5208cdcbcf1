"""CHGNet adapter: the upstream ``chgnet.model.CHGNet`` re-sequenced over a partitioned graph.

CHGNet has two graphs:

* the *atom graph* (cutoff 6 Å): directed edges, each with an undirected *bond* feature;
* the *bond graph* (cutoff 3 Å): its nodes are the short bonds, its edges are *angles*, ordered
  pairs (i, j) of distinct short directed edges leaving the same centre atom.

Ownership on worker p (every edge, bond update and angle computed exactly once):

* atom-graph edge → owner of its receiver (the CHGNet "centre"), as for every model;
* angle → owner of its centre atom; all short edges of an owned centre are local, so angle
  features never travel;
* short bond {a, b} → owner of its canonical end (the smaller global index; for a self-image
  bond a = b both ends are the same atom), declared in ``prepare`` as the row kind ``"bonds"``.
  Angle messages onto a bond are summed at *both* ends, possibly on two workers: each sums its
  partial messages, ``exchange.rows("bonds").reduce`` adds the non-owner's part into the
  owner's row, the owner applies ``mlp_out`` + residual (+ norm), and the bond exchange sends
  the new bond row back;
* long bonds (> 3 Å) only ever get the zero-message update, which every worker applies to its
  own copy (one per directed edge): no communication.

Per message-passing layer: one atom exchange (except layer 0, whose embedding depends only on
species), one bond reduce and one bond exchange. The bonds and angles are derived once per
graph build (``prepare``); with a Verlet skin, from the edges up to 3 Å + skin, re-selected
by their current lengths at every call (a candidate longer than 3 Å takes no angle, and its
zero-message update is exactly the long-bond update). Everything geometric comes from
``inputs.vectors``, so forces and stress follow from the engine's edge-vector gradients.

Energies: CHGNet's per-atom energy times N is Σ_i mlp(h_i) + Σ_i w_{Z_i} (``AtomRef``), so
the per-atom energy of atom i is ``mlp(h_i) + w_{Z_i}``. Magnetic moments |site_wise(h_i)|
(μB) after the second-to-last atom convolution are returned as the site property
``magmoms``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass

import numpy as np
import torch

from distmlip.exchange import (
    Exchange,
    GraphTopology,
    RowDeclarer,
    sum_into,
    undirected_edge_keys,
)
from distmlip.models.base import DistributedModel, GraphInputs

__all__ = ["CHGNetAdapter", "BondGraph", "build_bond_graph", "load_chgnet"]

CHGNET_VERSIONS = ("0.3.0", "0.2.0", "r2scan")


def load_chgnet(model_name: str = "0.3.0"):
    """The pretrained CHGNet shipped in the ``chgnet`` package, on the CPU, quietly."""
    from chgnet.model import CHGNet

    if model_name not in CHGNET_VERSIONS:
        raise ValueError(
            f"unknown CHGNet model_name {model_name!r}; the chgnet package ships "
            f"{', '.join(CHGNET_VERSIONS)}"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        return CHGNet.load(model_name=model_name, use_device="cpu", verbose=False)


@dataclass
class BondGraph:
    """One worker's candidate bonds and angles, from ``prepare`` (numpy, local indices).

    Candidate bonds are the edges no longer than ``bond_cutoff + skin`` when the graph was
    built: with a Verlet skin every edge that can become a bond while the graph is reused. Each
    undirected candidate is one row of the declared row kind ``"bonds"`` (rows
    ``[owned..., halo...]``); long edges get one row each per call, after them.

    Attributes:
        short_row: (E,) bond row of each edge of the prepared graph, −1 if not a candidate.
        bond_edge: (n_short,) a prepared-graph edge of each bond row (its length is the bond's).
        n_short: bond rows (owned + halo).
        angle_edges: (A, 2) candidate angles (i, j): distinct candidate edges with the same
            (owned) centre; i collects the message. Filtered by current lengths per call.
    """

    short_row: np.ndarray
    bond_edge: np.ndarray
    n_short: int
    angle_edges: np.ndarray

    def __post_init__(self):
        self._tensors: dict = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(short_row, bond_edge, angle_edges) as int64 tensors on ``device`` (cached)."""
        if device not in self._tensors:
            self._tensors[device] = tuple(
                torch.as_tensor(array, dtype=torch.int64, device=device)
                for array in (self.short_row, self.bond_edge, self.angle_edges)
            )
        return self._tensors[device]


def build_bond_graph(topology: GraphTopology, rows: RowDeclarer, bond_cutoff: float) -> BondGraph:
    """Candidate bonds (declared as the row kind ``"bonds"``) and angles of one worker."""
    reach = bond_cutoff + topology.skin
    lengths = np.linalg.norm(topology.vectors, axis=1)
    candidates = np.flatnonzero(lengths <= reach)
    keys, _, owners = undirected_edge_keys(topology, candidates, rows)
    layout = rows.declare("bonds", keys, owners)
    short_row = np.full(len(lengths), -1, dtype=np.int64)
    short_row[candidates] = layout.row

    # Angles: ordered pairs of distinct candidate edges with the same (owned) centre.
    centers = topology.receivers[candidates]
    by_center = np.argsort(centers, kind="stable")
    sorted_edges = candidates[by_center]
    _, starts, counts = np.unique(centers[by_center], return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(counts)), counts)
    pairs_per = counts[group]
    first_pos = np.repeat(np.arange(len(sorted_edges)), pairs_per)
    block = np.repeat(np.cumsum(pairs_per) - pairs_per, pairs_per)
    second_pos = starts[group][first_pos] + (np.arange(int(pairs_per.sum())) - block)
    distinct = first_pos != second_pos
    angle_edges = np.stack(
        [sorted_edges[first_pos[distinct]], sorted_edges[second_pos[distinct]]], axis=1
    )
    return BondGraph(
        short_row=short_row,
        bond_edge=candidates[layout.first_key_of_row],
        n_short=layout.n_local,
        angle_edges=angle_edges.astype(np.int64).reshape(-1, 2),
    )


class CHGNetAdapter(DistributedModel):
    """A ``chgnet.model.CHGNet`` evaluated on a partitioned graph (weights and modules reused).

    Args:
        model: a ``chgnet.model.CHGNet`` (pretrained or fine-tuned). Needs ``mlp_first=True``
            (per-atom energies, as in every shipped checkpoint) and an ``AtomRef`` composition
            model or none.

    Outputs per owned atom: energy (eV, CHGNet's energy per atom × N split by atom) and, as the
    site property ``magmoms``, the magnetic moment (μB).
    """

    site_properties = ("magmoms",)

    def __init__(self, model):
        super().__init__()
        from chgnet.model import CHGNet
        from chgnet.model.composition_model import AtomRef

        if not isinstance(model, CHGNet):
            raise TypeError(f"expected a chgnet.model.CHGNet, got {type(model).__name__}")
        if not model.mlp_first:
            raise NotImplementedError(
                "CHGNet with mlp_first=False pools features before the readout, so its energy "
                "is not a sum of per-atom terms; only mlp_first=True models can be distributed"
            )
        composition = model.composition_model
        if composition is not None and not isinstance(composition, AtomRef):
            raise NotImplementedError(
                f"composition model {type(composition).__name__} is not supported (AtomRef is)"
            )
        if next(model.parameters()).device.type != "cpu":
            model = copy.deepcopy(model).cpu()
        self.model = model
        self.cutoff = float(model.graph_converter.atom_graph_cutoff)
        self.bond_cutoff = float(model.graph_converter.bond_graph_cutoff)
        # A bond (< bond cutoff + skin when prepared) must stay in the atom graph while reused.
        self.max_skin = (self.cutoff - self.bond_cutoff) / 2
        n_elements = model.atom_embedding.embedding.num_embeddings
        self.supported_numbers = frozenset(range(1, n_elements + 1))

    @property
    def version(self) -> str | None:
        return self.model.version

    def _reference_energies(self, numbers: torch.Tensor) -> torch.Tensor:
        composition = self.model.composition_model
        if composition is None:
            weight = self.model.site_wise.weight
            return torch.zeros(numbers.shape, dtype=weight.dtype, device=weight.device)
        return composition.fc.weight[0, numbers - 1]

    def _bond_tail(self, layer, aggregated: torch.Tensor, bonds: torch.Tensor) -> torch.Tensor:
        """The per-bond end of ``BondConv.forward``: mlp_out, residual, norm."""
        if layer.use_mlp_out:
            aggregated = layer.mlp_out(aggregated)
        if layer.resnet:
            aggregated = aggregated + bonds
        if layer.bond_norm is not None:
            aggregated = layer.bond_norm(aggregated)
        return aggregated

    def prepare(self, topology: GraphTopology, rows: RowDeclarer) -> BondGraph:
        return build_bond_graph(topology, rows, self.bond_cutoff)

    def _this_call(self, inputs: GraphInputs, lengths: torch.Tensor):
        """(edge_bond, bond_edge, angle_edges) of this call's edges, from the prepared graph:
        candidate bonds keep their rows, long edges get one row each, angles are the candidate
        ones whose bond i is <= and partner j < the bond cutoff now."""
        bonds: BondGraph = inputs.prepared
        short_row, bond_edge, angle_edges = bonds.on(lengths.device)
        kept = inputs.kept_edges
        if kept is not None:  # a reused Verlet-skin graph: map prepared edges to this call's
            position = torch.full_like(short_row, -1)
            position[kept] = torch.arange(len(kept), device=kept.device)
            short_row, bond_edge = short_row[kept], position[bond_edge]
            if bool((bond_edge < 0).any()):
                raise RuntimeError(
                    f"a CHGNet bond left the {self.cutoff} Å graph while it was reused; use a "
                    f"skin below {(self.cutoff - self.bond_cutoff) / 2:.1f} Å"
                )
            angle_edges = position[angle_edges]
            angle_edges = angle_edges[(angle_edges >= 0).all(dim=1)]
        current = lengths.detach()
        angle_edges = angle_edges[
            (current[angle_edges[:, 0]] <= self.bond_cutoff)
            & (current[angle_edges[:, 1]] < self.bond_cutoff)
        ]
        long_edges = torch.nonzero(short_row < 0).view(-1)
        edge_bond = short_row.clone()
        edge_bond[long_edges] = bonds.n_short + torch.arange(
            len(long_edges), device=short_row.device
        )
        return edge_bond, torch.cat([bond_edge, long_edges]), angle_edges

    def forward(self, inputs: GraphInputs, exchange: Exchange):
        chgnet = self.model
        n_owned = inputs.n_owned
        n_short = inputs.prepared.n_short
        bond_rows = exchange.rows("bonds")

        # Geometry, from the edge vectors only. CHGNet's bond vector is centre − neighbour,
        # i.e. −v; angles use unit vectors (the sign cancels in the cosine, kept for clarity).
        lengths = torch.linalg.norm(inputs.vectors, dim=1)
        unit = -inputs.vectors / lengths.unsqueeze(1)
        edge_bond, bond_edge, angle_edges = self._this_call(inputs, lengths)
        angle_center = inputs.receivers[angle_edges[:, 0]]
        angle_i, angle_j = edge_bond[angle_edges[:, 0]], edge_bond[angle_edges[:, 1]]
        bond_graph = torch.stack([angle_center, angle_i, angle_j], dim=1)
        # Upstream skips bond and angle updates when the whole structure has no angle.
        has_angles = exchange.sum_over_ranks(len(angle_edges)) > 0

        bond_lengths = lengths[bond_edge]
        encoder = chgnet.bond_basis_expansion
        bases_ag = encoder.rbf_expansion_ag(bond_lengths)
        bases_bg = encoder.rbf_expansion_bg(bond_lengths)

        embedded = chgnet.atom_embedding(inputs.numbers - 1)  # all local rows: species only
        bond_feas = chgnet.bond_embedding(bases_ag)
        weights_ag = chgnet.bond_weights_ag(bases_ag)
        weights_bg = chgnet.bond_weights_bg(bases_bg)[:n_short]
        if has_angles:
            angle_bases = chgnet.angle_basis_expansion(
                unit[angle_edges[:, 0]], unit[angle_edges[:, 1]]
            )
            angle_feas = chgnet.angle_embedding(angle_bases)
        else:
            angle_feas = None

        centre, neighbour = inputs.receivers, inputs.senders

        def convolve(layer, atoms: torch.Tensor, bonds: torch.Tensor) -> torch.Tensor:
            """Upstream ``AtomConv.forward`` on the local graph, re-sequenced so that its edge
            messages are summed in chunks (each a checkpoint region when checkpointing: one
            chunk's activations at a time); the owned rows of its output."""

            def messages(atoms, bonds, start: int, stop: int):
                part = slice(start, stop)
                undirected = edge_bond[part]
                messages = torch.cat(
                    [atoms[centre[part]], bonds[undirected], atoms[neighbour[part]]], dim=1
                )
                return layer.twoBody_atom(messages) * weights_ag[undirected]

            aggregated = atoms.new_zeros((n_owned, atoms.shape[1]))  # receivers are owned
            for start, stop in exchange.chunks(len(centre)):
                chunk = exchange.checkpoint(messages, atoms, bonds, start, stop)
                aggregated = sum_into(aggregated, centre[start:stop], chunk)  # keeps no chunk
            # Per atom from here (mlp_out, residual, norm): the owned rows are all we need.
            if layer.use_mlp_out:
                aggregated = layer.mlp_out(aggregated)
            if layer.resnet:
                aggregated = aggregated + atoms[:n_owned]
            if layer.atom_norm is not None:
                aggregated = layer.atom_norm(aggregated)
            return aggregated

        def update_bonds(idx, owned, bond_feas, angle_feas):
            """Layer ``idx``'s bond and angle updates: new local bonds and angles."""
            _, bond_layer, angle_layer = layers[idx]
            short = bond_feas[:n_short]
            messages = bond_layer.twoBody_bond(
                torch.cat([short[angle_i], short[angle_j], angle_feas, owned[angle_center]], dim=1)
            )
            messages = messages * weights_bg[angle_i] * weights_bg[angle_j]
            partial = short.new_zeros(short.shape).index_add(0, angle_i, messages)
            summed = bond_rows.reduce(partial)
            new_owned = self._bond_tail(bond_layer, summed, short[: bond_rows.n_owned])
            new_short = bond_rows(new_owned)
            long = bond_feas[n_short:]
            new_long = self._bond_tail(bond_layer, torch.zeros_like(long), long)
            bond_feas = torch.cat([new_short, new_long], dim=0)
            if angle_layer is not None:
                angle_feas = angle_layer(
                    atom_feas=owned,
                    bond_feas=new_short,
                    angle_feas=angle_feas,
                    bond_graph=bond_graph,
                )
            return bond_feas, angle_feas

        owned = embedded[:n_owned]
        magmoms = None
        layers = list(
            zip(
                chgnet.atom_conv_layers[:-1],
                chgnet.bond_conv_layers,
                chgnet.angle_layers,
                strict=False,
            )
        )
        for idx, (atom_layer, bond_layer, _) in enumerate(layers):
            # Layer 0 reads only species (known for the halo too): no exchange.
            atoms = exchange(owned) if idx > 0 else embedded
            owned = convolve(atom_layer, atoms, bond_feas)
            if has_angles and bond_layer is not None:
                bond_feas, angle_feas = exchange.checkpoint(
                    update_bonds, idx, owned, bond_feas, angle_feas
                )
            if idx == chgnet.n_conv - 2:
                magmoms = torch.abs(chgnet.site_wise(owned)).view(-1)

        owned = convolve(chgnet.atom_conv_layers[-1], exchange(owned), bond_feas)
        if chgnet.readout_norm is not None:
            owned = chgnet.readout_norm(owned)
        energies = chgnet.mlp(owned).view(-1)
        if magmoms is None:
            magmoms = energies.new_zeros(n_owned)
        energies = energies + self._reference_energies(inputs.numbers[:n_owned]).to(energies.dtype)
        return energies, {"magmoms": magmoms}
