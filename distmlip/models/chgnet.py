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
  bond a = b both ends are the same atom). Angle messages onto a bond are summed at *both*
  ends, possibly on two workers: each sums its partial messages, :meth:`Communicator.reduce`
  adds the non-owner's part into the owner's row, the owner applies ``mlp_out`` + residual
  (+ norm), and :meth:`Communicator.exchange` sends the new bond row back;
* long bonds (> 3 Å) only ever get the zero-message update, which every worker applies to its
  own copy (one per directed edge): no communication.

Per message-passing layer: one atom exchange (except layer 0, whose embedding depends only on
species), one bond reduce and one bond exchange. Everything geometric comes from
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

from distmlip.halo import HaloPlan, edge_vectors, rows_of
from distmlip.models.base import DistributedModel, Exchange, GraphInputs

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
    """One worker's bonds and angles, in local indices (numpy).

    Local bond rows are ``[short owned..., short halo..., long...]``: the first ``plan.n_local``
    rows follow the bond :class:`HaloPlan` (halo rows grouped by owner rank), then one row per
    long directed edge.

    Attributes:
        edge_bond: (E,) bond row of each directed edge.
        bond_edge: (n_rows,) a local directed edge of each bond row (its length defines the
            bond's basis; both directions have the same length).
        n_short: short bond rows (owned + halo) = ``plan.n_local``.
        angle_center: (A,) owned atom row of each angle.
        angle_edges: (A, 2) the directed edges (i, j) of each angle.
        angle_bonds: (A, 2) their bond rows (i collects the message).
        plan: the bond halo plan (resolved).
    """

    edge_bond: np.ndarray
    bond_edge: np.ndarray
    n_short: int
    angle_center: np.ndarray
    angle_edges: np.ndarray
    angle_bonds: np.ndarray
    plan: HaloPlan


def _bond_keys(n_atoms: int, receivers_g, senders_g, shifts, comm):
    """Global int64 key of each undirected bond and whether the edge is its canonical direction.

    The canonical direction of bond {a, b, S} has receiver min(a, b); for a self-image bond
    (a = b) the one whose shift's first non-zero component is positive. The key packs
    (min end, max end, canonical shift) with a shift range agreed by all ranks (collective).
    """
    nonzero = shifts != 0
    first = np.argmax(nonzero, axis=1)
    negative = shifts[np.arange(len(shifts)), first] < 0
    flip = (receivers_g > senders_g) | ((receivers_g == senders_g) & negative)
    low = np.where(flip, senders_g, receivers_g)
    high = np.where(flip, receivers_g, senders_g)
    canonical_shift = np.where(flip[:, None], -shifts, shifts)
    local_bound = int(np.abs(canonical_shift).max()) if len(shifts) else 0
    bound = comm.allreduce_int(local_bound, "max")
    base = 2 * bound + 1
    n = int(n_atoms)
    if float(n) * n * float(base) ** 3 >= 2.0**62:
        raise ValueError(
            f"cannot key the CHGNet bonds of {n} atoms with image shifts up to {bound} in int64"
        )
    code = ((canonical_shift[:, 0] + bound) * base + canonical_shift[:, 1] + bound) * base
    code = code + canonical_shift[:, 2] + bound
    return (low * n + high) * base**3 + code, flip


def build_bond_graph(inputs: GraphInputs, bond_cutoff: float) -> BondGraph:
    """Bonds, angles and the bond halo plan of one worker (collective: every rank calls it)."""
    graph, structure, comm = inputs.graph, inputs.structure, inputs.comm
    rank, world = graph.rank, graph.world_size
    edges = graph.edges
    n_edges = len(edges)
    gidx = graph.global_index
    vectors = edge_vectors(graph, structure)
    lengths = np.linalg.norm(vectors, axis=1)
    # CHGNet: a bond enters the bond graph if its length <= cutoff, a partner if < cutoff.
    short = lengths <= bond_cutoff
    partner = lengths < bond_cutoff

    short_edges = np.flatnonzero(short)
    keys, flip = _bond_keys(
        structure.n_atoms,
        gidx[edges.receivers[short_edges]],
        gidx[edges.senders[short_edges]],
        edges.shifts[short_edges].astype(np.int64),
        comm,
    )
    local_owner = np.concatenate(
        [np.full(graph.n_owned, rank, dtype=np.int64), graph.halo_owner.astype(np.int64)]
    )
    owner = np.where(flip, local_owner[edges.senders[short_edges]], rank)
    unique_keys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    unique_owner = owner[first]
    order = np.lexsort((unique_keys, unique_owner, unique_owner != rank))
    row_of_unique = np.empty(len(order), dtype=np.int64)
    row_of_unique[order] = np.arange(len(order))
    ordered_keys = unique_keys[order]
    n_owned_bonds = int(np.sum(unique_owner == rank))
    recv_counts = np.bincount(unique_owner[unique_owner != rank], minlength=world).astype(np.int64)
    halo_keys = ordered_keys[n_owned_bonds:]
    requests = np.split(halo_keys, np.cumsum(recv_counts)[:-1])
    send_index = rows_of(ordered_keys[:n_owned_bonds], comm.exchange_requests(requests), rank)
    plan = HaloPlan(rank, world, n_owned_bonds, recv_counts, tuple(send_index))
    n_short = len(order)

    long_edges = np.flatnonzero(~short)
    edge_bond = np.empty(n_edges, dtype=np.int64)
    edge_bond[short_edges] = row_of_unique[inverse.reshape(-1)]
    edge_bond[long_edges] = n_short + np.arange(len(long_edges))
    bond_edge = np.concatenate([short_edges[first[order]], long_edges]).astype(np.int64)

    # Angles: ordered pairs of distinct short edges with the same (owned) centre.
    centers = edges.receivers[short_edges]
    by_center = np.argsort(centers, kind="stable")
    sorted_edges = short_edges[by_center]
    _, starts, counts = np.unique(centers[by_center], return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(counts)), counts)
    pairs_per = counts[group]
    first_pos = np.repeat(np.arange(len(sorted_edges)), pairs_per)
    block = np.repeat(np.cumsum(pairs_per) - pairs_per, pairs_per)
    second_pos = starts[group][first_pos] + (np.arange(int(pairs_per.sum())) - block)
    edge_i, edge_j = sorted_edges[first_pos], sorted_edges[second_pos]
    keep = (first_pos != second_pos) & partner[edge_j]
    edge_i, edge_j = edge_i[keep], edge_j[keep]
    return BondGraph(
        edge_bond=edge_bond,
        bond_edge=bond_edge,
        n_short=n_short,
        angle_center=edges.receivers[edge_i].astype(np.int64),
        angle_edges=np.stack([edge_i, edge_j], axis=1).astype(np.int64),
        angle_bonds=np.stack([edge_bond[edge_i], edge_bond[edge_j]], axis=1),
        plan=plan,
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
        n_elements = model.atom_embedding.embedding.num_embeddings
        self.supported_numbers = frozenset(range(1, n_elements + 1))
        self.last_site_properties: dict[str, torch.Tensor] = {}

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

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        chgnet = self.model
        comm = inputs.comm
        n_owned = inputs.n_owned
        device = inputs.vectors.device
        bonds = build_bond_graph(inputs, self.bond_cutoff)
        plan = bonds.plan
        n_short = bonds.n_short

        def index(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(array, dtype=torch.int64, device=device)

        edge_bond = index(bonds.edge_bond)
        angle_center = index(bonds.angle_center)
        angle_i, angle_j = index(bonds.angle_bonds[:, 0]), index(bonds.angle_bonds[:, 1])
        bond_graph = torch.stack([angle_center, angle_i, angle_j], dim=1)
        atom_graph = torch.stack([inputs.receivers, inputs.senders], dim=1)
        # Upstream skips bond and angle updates when the whole structure has no angle.
        has_angles = comm.allreduce_int(len(bonds.angle_center)) > 0

        # Geometry, from the edge vectors only. CHGNet's bond vector is centre − neighbour,
        # i.e. −v; angles use unit vectors (the sign cancels in the cosine, kept for clarity).
        lengths = torch.linalg.norm(inputs.vectors, dim=1)
        unit = -inputs.vectors / lengths.unsqueeze(1)
        bond_lengths = lengths[index(bonds.bond_edge)]
        encoder = chgnet.bond_basis_expansion
        bases_ag = encoder.rbf_expansion_ag(bond_lengths)
        bases_bg = encoder.rbf_expansion_bg(bond_lengths)

        atoms = chgnet.atom_embedding(inputs.numbers - 1)  # all local rows: species only
        bond_feas = chgnet.bond_embedding(bases_ag)
        weights_ag = chgnet.bond_weights_ag(bases_ag)
        weights_bg = chgnet.bond_weights_bg(bases_bg)[:n_short]
        if has_angles:
            angle_bases = chgnet.angle_basis_expansion(
                unit[index(bonds.angle_edges[:, 0])], unit[index(bonds.angle_edges[:, 1])]
            )
            angle_feas = chgnet.angle_embedding(angle_bases)

        def convolve(layer, atoms: torch.Tensor, bonds: torch.Tensor) -> torch.Tensor:
            """One upstream AtomConv on the local graph; the owned rows of its output."""
            return layer(
                atom_feas=atoms,
                bond_feas=bonds,
                bond_weights=weights_ag,
                atom_graph=atom_graph,
                directed2undirected=edge_bond,
            )[:n_owned]

        owned = atoms[:n_owned]
        magmoms = None
        layers = zip(
            chgnet.atom_conv_layers[:-1],
            chgnet.bond_conv_layers,
            chgnet.angle_layers,
            strict=False,
        )
        for idx, (atom_layer, bond_layer, angle_layer) in enumerate(layers):
            if idx > 0:
                atoms = exchange(owned)
            owned = convolve(atom_layer, atoms, bond_feas)

            if has_angles and bond_layer is not None:
                short = bond_feas[:n_short]
                messages = bond_layer.twoBody_bond(
                    torch.cat(
                        [short[angle_i], short[angle_j], angle_feas, owned[angle_center]], dim=1
                    )
                )
                messages = messages * weights_bg[angle_i] * weights_bg[angle_j]
                partial = short.new_zeros(short.shape).index_add(0, angle_i, messages)
                summed = comm.reduce(partial, plan)
                new_owned = self._bond_tail(bond_layer, summed, short[: plan.n_owned])
                new_short = comm.exchange(new_owned, plan)
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
            if idx == chgnet.n_conv - 2:
                magmoms = torch.abs(chgnet.site_wise(owned)).view(-1)

        atoms = exchange(owned)
        owned = convolve(chgnet.atom_conv_layers[-1], atoms, bond_feas)
        if chgnet.readout_norm is not None:
            owned = chgnet.readout_norm(owned)
        energies = chgnet.mlp(owned).view(-1)
        if magmoms is None:
            magmoms = energies.new_zeros(n_owned)
        self.last_site_properties = {"magmoms": magmoms}
        return energies + self._reference_energies(inputs.numbers[:n_owned]).to(energies.dtype)
